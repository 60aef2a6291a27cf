"""Test-time augmentation against fold ensembles against both, at equal prediction cost (issue 28).

    OMP_NUM_THREADS=2 .venv/bin/python -m experiments.ensemble_vs_tta WORK TEST_DATA --out reports/ensemble_vs_tta

WORK is the folder of `unetseg-cv train` and `unetseg-cv score`: K fold networks (their final
checkpoints) and the post-processing tuned on their out-of-fold probabilities. TEST_DATA holds
images and masks that no fold trained on and that chose nothing (no checkpoint, no threshold), so
every score here is of unseen images.

Each fold's network predicts each test image once in each of the 8 flips and quarter turns (a
view: the network run on the turned tiles, its output turned back). A variant averages the
probabilities of some networks in some views, so its cost is networks x views forward passes a
tile, and variants of equal cost are compared on the same images:

- 1 pass: one network (each fold's in turn);
- 4 passes: one network in 4 views (the flips) against an ensemble of 4 folds;
- 8 passes: one network in 8 views (unetseg's TTA) against 4 folds in 2 views (identity, flip);
- 5 and 40 passes: the K-fold ensemble, without and with TTA.

Variants built from one fold or a subset of folds are scored for every fold (or every left-out
fold) and averaged; every variant uses the same post-processing. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unetseg.evaluation.crossval import fold_checkpoint, fold_splits
from unetseg.evaluation.metrics import segmentation_scores, summarize
from unetseg.inference.engine import DIHEDRAL_VIEWS as VIEWS
from unetseg.inference.engine import dihedral_view, undo_dihedral_view
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.inference.postprocess import to_labels
from unetseg.inference.tiling import TilingConfig
from unetseg.inference.volume import spatial_dims
from unetseg.io import find_pairs, pair_name, read_image, read_labels, to_channels
from unetseg.io.labels import as_instances
from unetseg.io.modality import image_features, modality_names
from unetseg.spec import InputSpec, label_settings

FLIPS = (0, 2, 4, 6)  # identity, half turn, flip of x, flip of y (= flip of x and a half turn)
IDENTITY_AND_FLIP = (0, 4)


class View(nn.Module):
    """A network run on view `view` of its tiles (the engine's `dihedral_view`), its logits turned back: one of
    the 8 passes of unetseg's TTA as a network of its own."""

    def __init__(self, network: nn.Module, view: int):
        super().__init__()
        self.network, self.view = network, view
        self.spatial_dims = spatial_dims(network)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return undo_dihedral_view(self.network(dihedral_view(tiles, self.view)), self.view)


def view_probabilities(
    network: nn.Module, view: int, spec: InputSpec, image: np.ndarray, settings: PredictSettings
) -> np.ndarray:
    """(classes, H, W) float32 probabilities of `network` in one view (one-class models too)."""
    probs = np.asarray(predict_image(View(network, view), spec, image, settings), np.float32)
    return probs[None] if probs.ndim == 2 else probs


def variants(folds: int) -> list[tuple[str, int, list[tuple[tuple[int, ...], tuple[int, ...]]]]]:
    """(name, passes a tile, instances): each instance is (folds, views) whose probabilities are averaged."""
    each = range(folds)
    leave_one_out = [tuple(f for f in each if f != out) for out in each]
    everything = tuple(each)
    return [
        ("one network", 1, [((f,), (0,)) for f in each]),
        ("one network, 4 views (flips)", 4, [((f,), FLIPS) for f in each]),
        (f"{folds - 1}-fold ensemble", folds - 1, [(subset, (0,)) for subset in leave_one_out]),
        ("one network, 8 views (TTA)", 8, [((f,), tuple(range(VIEWS))) for f in each]),
        (f"{folds - 1}-fold ensemble, 2 views", 2 * (folds - 1), [(s, IDENTITY_AND_FLIP) for s in leave_one_out]),
        (f"{folds}-fold ensemble", folds, [(everything, (0,))]),
        (f"{folds}-fold ensemble, 8 views (TTA)", folds * VIEWS, [(everything, tuple(range(VIEWS)))]),
    ]


def postprocessing(work: Path, spec: InputSpec) -> tuple[dict, str]:
    """The post-processing every variant uses: tuned on the out-of-fold probabilities where `score` tuned it,
    else the one stored in the fold checkpoints (`spec`)."""
    scored = json.loads((work / "cv.json").read_text()) if (work / "cv.json").exists() else {}
    if "tuned_postprocess" in scored:
        return label_settings(scored["tuned_postprocess"]["settings"]), "tuned on the out-of-fold probabilities"
    return label_settings(spec.postprocess), "stored in the fold checkpoints (not tuned)"


def run(work: Path, test: Path, tile_size: int, limit: int | None) -> dict:
    splits = fold_splits(work)
    folds, trained_on = len(splits), set(splits[0]["assigned"])  # every image a fold trained or validated on
    networks = [load_predictor(fold_checkpoint(work, f), "cpu") for f in range(folds)]
    spec = networks[0][1]
    settings = PredictSettings("prob", tiling=TilingConfig(tile_size=tile_size, tta=False))
    labels, chosen = postprocessing(work, spec)
    table = variants(folds)
    per_image = {name: [[] for _ in instances] for name, _, instances in table}
    groups, seconds = [], []
    pairs = find_pairs(test)[:limit]
    for index, (image_path, mask_path) in enumerate(pairs):
        name = pair_name(image_path, test / "images")
        if name in trained_on:
            raise ValueError(f"{image_path}: a fold of {work} trained on this image; the test images must be unseen")
        stored = read_image(image_path)
        truth = as_instances(read_labels(mask_path))
        groups.append(modality_names(image_features(to_channels(stored, 3)))[0])
        started = time.perf_counter()
        probs = [
            [view_probabilities(network, view, spec, stored, settings) for view in range(VIEWS)]
            for network, _ in networks
        ]
        seconds.append((time.perf_counter() - started) / (folds * VIEWS))
        for variant, _, instances in table:
            for slot, (members, views) in enumerate(instances):
                mean = np.mean([probs[f][v] for f in members for v in views], axis=0)
                per_image[variant][slot].append(segmentation_scores(to_labels(mean, **labels), truth))
        print(f"{index + 1}/{len(pairs)} {name} ({groups[-1]}): {seconds[-1]:.2f} s a pass", flush=True)
    return summarise(table, per_image, groups, seconds, labels, chosen, folds, work, test)


def summarise(table, per_image, groups, seconds, labels, chosen, folds, work, test) -> dict:
    """Scores per variant (mean over instances, their spread), per image type, and paired differences."""
    kinds = sorted(set(groups))
    rows = []
    for variant, passes, instances in table:
        by_instance = [summarize(scores) for scores in per_image[variant]]
        dsb = [s["dsb_score"] for s in by_instance]
        image_dsb = np.mean([[s["dsb_score"] for s in scores] for scores in per_image[variant]], axis=0)
        rows.append(
            {
                "variant": variant,
                "passes": passes,
                "instances": len(instances),
                "dice": float(np.mean([s["dice"] for s in by_instance])),
                "dsb": float(np.mean(dsb)),
                "dsb_spread": float(np.std(dsb)) if len(dsb) > 1 else None,
                "f1": float(np.mean([s["f1"] for s in by_instance])),
                "pq": float(np.mean([s["pq"] for s in by_instance])),
                "dsb_by_type": {k: float(np.mean([d for d, g in zip(image_dsb, groups) if g == k])) for k in kinds},
                "image_dsb": image_dsb.tolist(),
            }
        )
    by_name = {row["variant"]: row for row in rows}
    pairs = [
        ("one network, 4 views (flips)", f"{folds - 1}-fold ensemble"),
        ("one network, 8 views (TTA)", f"{folds - 1}-fold ensemble, 2 views"),
        ("one network, 8 views (TTA)", f"{folds}-fold ensemble"),
        (f"{folds}-fold ensemble", f"{folds}-fold ensemble, 8 views (TTA)"),
    ]
    comparisons = []
    for a, b in pairs:
        difference = np.asarray(by_name[b]["image_dsb"]) - np.asarray(by_name[a]["image_dsb"])
        comparisons.append(
            {
                "a": a,
                "b": b,
                "passes": [by_name[a]["passes"], by_name[b]["passes"]],
                "dsb_difference": float(difference.mean()),
                "standard_error": float(difference.std(ddof=1) / np.sqrt(len(difference))),
                "b_better_on": int((difference > 0).sum()),
                "a_better_on": int((difference < 0).sum()),
            }
        )
    return {
        "work": str(work),
        "test": str(test),
        "images": len(groups),
        "images_by_type": {k: groups.count(k) for k in kinds},
        "folds": folds,
        "postprocess": labels,
        "postprocess_chosen": chosen,
        "seconds_per_pass": float(np.mean(seconds)),
        "threads": torch.get_num_threads(),
        "variants": rows,
        "comparisons": comparisons,
    }


def format_report(result: dict) -> str:
    kinds = list(result["images_by_type"])
    header = "| variant | passes a tile | Dice | DSB | DSB spread | F1 | PQ | " + " | ".join(f"DSB {k}" for k in kinds)
    lines = [
        f"# TTA against fold ensembles on {result['images']} unseen images",
        "",
        f"{result['folds']} fold networks of `{result['work']}`, scored on `{result['test']}` "
        f"({', '.join(f'{n} {k}' for k, n in result['images_by_type'].items())}); post-processing "
        f"{result['postprocess']} ({result['postprocess_chosen']}). A pass took {result['seconds_per_pass']:.2f} s "
        f"an image on {result['threads']} thread(s). Variants of one fold (or of a subset of folds) are the mean "
        "over every fold (subset); the spread is the standard deviation of their DSB scores.",
        "",
        header + " |",
        "|" + "---|" * (7 + len(kinds)),
    ]
    for row in result["variants"]:
        spread = f"{row['dsb_spread']:.3f}" if row["dsb_spread"] is not None else "-"
        types = " | ".join(f"{row['dsb_by_type'][k]:.3f}" for k in kinds)
        lines.append(
            f"| {row['variant']} | {row['passes']} | {row['dice']:.3f} | {row['dsb']:.3f} | {spread} | "
            f"{row['f1']:.3f} | {row['pq']:.3f} | {types} |"
        )
    lines += ["", "Paired over images (DSB score of b minus a; s.e. over images):", ""]
    lines += ["| a | b | passes | DSB b - a | s.e. | images b better / a better |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['a']} | {c['b']} | {c['passes'][0]} / {c['passes'][1]} | {c['dsb_difference']:+.4f} | "
            f"{c['standard_error']:.4f} | {c['b_better_on']} / {c['a_better_on']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the --work folder of unetseg-cv train (and score)")
    parser.add_argument("test", type=Path, help="images/ and masks/ no fold trained on")
    parser.add_argument("--out", type=Path, default=Path("reports/ensemble_vs_tta"), help="OUT.json and OUT.md")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="only the first N test images (a quick check)")
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    if args.report_only:
        result = json.loads(json_path.read_text())
    else:
        result = run(args.work, args.test, args.tile_size, args.limit)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(format_report(result))
    print(format_report(result))


if __name__ == "__main__":
    main()
