"""k-fold cross-validation, the nnU-Net way: train every fold, predict each image with the one model that
never saw it (out of fold), tune the post-processing on those probabilities, score per image type.

Honesty rules, kept here so no caller can bend them:
- Each fold is scored with its *final* checkpoint (`last.ckpt`), never `best.ckpt`: the fold's
  validation images chose `best.ckpt`, so scoring them with it would be optimistic.
- Post-processing is tuned on out-of-fold probabilities, and the tuned score is reported beside
  the score of the stored (untuned) settings: the tuned one chose its settings on the same images,
  so it is marked as such; the untuned one is the honest estimate.
- The classical reference (Otsu threshold + distance-transform watershed) is scored on the same
  images, with nothing tuned.

A fold's run folder is `WORK/fold_I`; a finished fold leaves `WORK/fold_I/.cv_done`, so a rerun
skips it, and an interrupted one resumes from its `last.ckpt` (`--ckpt_path last`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

from unetseg.evaluation.metrics import segmentation_scores, summarize
from unetseg.evaluation.tune import tune_postprocess
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.inference.postprocess import to_labels
from unetseg.inference.tiling import TilingConfig
from unetseg.io import find_pairs, pair_name, read_image, read_labels, to_channels
from unetseg.io.labels import as_instances
from unetseg.io.modality import image_features, modality_names
from unetseg.spec import label_settings

__all__ = [
    "Case",
    "classical_labels",
    "ensemble_folds",
    "fold_checkpoint",
    "fold_dir",
    "out_of_fold",
    "score_cross_validation",
    "train_folds",
]

log = logging.getLogger(__name__)

DONE = ".cv_done"  # written into a fold's run folder when its training has finished


@dataclass
class Case:
    """One image predicted by the fold that did not train on it."""

    name: str
    group: str  # image type (`unetseg.io.modality`)
    fold: int
    probs: np.ndarray  # (classes, H, W) float16: out-of-fold probabilities
    truth: np.ndarray  # (H, W) instance labels
    image: np.ndarray  # (C, H, W) as stored, for the classical reference
    seconds: float  # prediction time of this image


def fold_dir(work: Path, fold: int) -> Path:
    return Path(work) / f"fold_{fold}"


def fold_checkpoint(work: Path, fold: int) -> Path:
    """The final checkpoint of a fold: the one scored out of fold (never best.ckpt, which its images chose)."""
    return fold_dir(work, fold) / "checkpoints" / "last.ckpt"


def train_folds(
    config: str,
    data: Path,
    folds: int,
    work: Path,
    only: Sequence[int] | None = None,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[int]:
    """Train the folds of `only` (default: all) one after another with `unetseg-train`, each into its run
    folder; finished folds are skipped, interrupted ones resumed. Returns the folds trained now."""
    trained = []
    for fold in range(folds) if only is None else only:
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} is not one of 0..{folds - 1}")
        run = fold_dir(work, fold)
        if (run / DONE).exists():
            log.info("fold %d: finished already (%s)", fold, run)
            continue
        command = [python, "-m", "unetseg", "train", "--config", config, "--data.root", str(data)]
        command += ["--data.folds", str(folds), "--data.fold", str(fold), "--trainer.default_root_dir", str(run)]
        command += list(extra)
        if fold_checkpoint(work, fold).exists():
            command += ["--ckpt_path", "last"]
        log.info("fold %d: %s", fold, " ".join(command))
        subprocess.run(command, check=True)
        (run / DONE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        trained.append(fold)
    return trained


def fold_splits(work: Path) -> dict[int, dict]:
    """The split.json of every fold run under `work`, by fold; ValueError when folds are missing or disagree."""
    splits = {}
    for path in sorted(Path(work).glob("fold_*/split.json")):
        split = json.loads(path.read_text())
        splits[int(split["fold"])] = split
    if not splits:
        raise ValueError(f"{work}: no fold_*/split.json; run `unetseg-cv train` first")
    folds = {split["folds"] for split in splits.values()}
    if len(folds) != 1 or sorted(splits) != list(range(folds.pop())):
        raise ValueError(f"{work}: folds {sorted(splits)} found; every fold of one cross-validation is needed")
    assigned = [split["assigned"] for split in splits.values()]
    if any(a != assigned[0] for a in assigned):
        raise ValueError(f"{work}: the folds assign images differently (different data or seeds)")
    return splits


def out_of_fold(
    work: Path, data: Path, tta: bool = False, tile_size: int = 256, on_image: Callable[[str], None] | None = None
) -> list[Case]:
    """Every image of `data` predicted (probabilities) by the final model of the one fold that did not train on it."""
    splits = fold_splits(work)
    pairs = {pair_name(image, Path(data) / "images"): (image, mask) for image, mask in find_pairs(data)}
    tiling = TilingConfig(tile_size=tile_size, overlap=min(TilingConfig().overlap, tile_size // 4), tta=tta)
    settings = PredictSettings("prob", tiling=tiling)
    cases = []
    for fold, split in sorted(splits.items()):
        model, spec = load_predictor(fold_checkpoint(work, fold), "cpu")
        for name in split["val"]:
            image_path, mask_path = pairs[name]
            stored = read_image(image_path)
            started = time.perf_counter()
            probs = predict_image(model, spec, stored, settings)
            seconds = time.perf_counter() - started
            image = to_channels(stored, 3)
            group = modality_names(image_features(image))[0]
            probs = (probs[None] if probs.ndim == 2 else probs).astype(np.float16)
            truth = as_instances(read_labels(mask_path))
            cases.append(Case(name, group, fold, probs, truth, image, seconds))
            if on_image is not None:
                on_image(name)
    return cases


def classical_labels(image: np.ndarray) -> np.ndarray:
    """The classical reference: Otsu threshold of the grey image, then the distance-transform watershed.

    Brightfield images (dark nuclei on a bright background) are inverted first, judged by whether
    the median is above the middle of the range.
    """
    grey = image.astype(np.float32).mean(axis=0)
    if np.median(grey) > 0.5 * (grey.min() + grey.max()):
        grey = grey.max() - grey
    foreground = grey > threshold_otsu(grey) if grey.max() > grey.min() else np.zeros(grey.shape, bool)
    return to_labels(foreground.astype(np.float32)[None])


def _by_group(cases: Sequence[Case], scores: Sequence[dict]) -> dict[str, dict]:
    groups = {"all": summarize(scores)}
    for group in sorted({case.group for case in cases}):
        groups[group] = summarize([s for case, s in zip(cases, scores) if case.group == group])
    return groups


def score_cross_validation(cases: Sequence[Case], stored: dict | None, tune: bool = True) -> dict:
    """Scores of the out-of-fold cases, per image type: with the stored post-processing (`stored`, the honest
    estimate), with post-processing tuned on these probabilities (chosen on the same images: marked so),
    and of the classical reference; plus the tuned settings and prediction times."""
    pairs = [(case.probs.astype(np.float32), case.truth) for case in cases]
    stored_settings = label_settings(stored)
    untuned = [segmentation_scores(to_labels(p, **stored_settings), t) for p, t in pairs]
    classical = [segmentation_scores(classical_labels(case.image), case.truth) for case in cases]
    result = {
        "images": len(cases),
        "folds": len({case.fold for case in cases}),
        "per_image": {case.name: {"fold": case.fold, "group": case.group} for case in cases},
        "stored_postprocess": {"settings": stored_settings, "scores": _by_group(cases, untuned)},
        "classical": {"what": "Otsu threshold + distance-transform watershed", "scores": _by_group(cases, classical)},
        "seconds_per_image": float(np.mean([case.seconds for case in cases])),
    }
    if tune:
        tuned = tune_postprocess(pairs, start=stored)
        scores = [segmentation_scores(to_labels(p, **tuned.settings), t) for p, t in pairs]
        result["tuned_postprocess"] = {
            "settings": tuned.settings,
            "chosen_on": "these out-of-fold probabilities (optimistic for these images; honest for unseen ones)",
            "scores": _by_group(cases, scores),
        }
    return result


def format_table(result: dict) -> str:
    """A Markdown table of Dice / DSB / F1 / PQ / AJI per image type for each variant of `score_cross_validation`."""
    variants = [("out of fold, stored post-processing", result["stored_postprocess"]["scores"])]
    if "tuned_postprocess" in result:
        variants.append(("out of fold, post-processing tuned on them", result["tuned_postprocess"]["scores"]))
    variants.append(("Otsu + watershed", result["classical"]["scores"]))
    lines = ["| variant | image type | images | Dice | DSB | F1 | PQ | AJI |", "|---|---|---|---|---|---|---|---|"]
    for label, groups in variants:
        for group, s in groups.items():
            lines.append(
                f"| {label} | {group} | {s['images']} | {s['dice']:.3f} | {s['dsb_score']:.3f} | {s['f1']:.3f} "
                f"| {s['pq']:.3f} | {s['aji']:.3f} |"
            )
    return "\n".join(lines)


def ensemble_folds(work: Path, target: Path, postprocess: dict | None = None, tta: bool = False) -> Path:
    """One model file of the final networks of every fold (`make_ensemble`), with `postprocess` stored in it."""
    from unetseg.models.checkpoint import make_ensemble, store_postprocess

    splits = fold_splits(work)
    path = make_ensemble([fold_checkpoint(work, fold) for fold in sorted(splits)], target)
    if postprocess is not None:
        store_postprocess(path, path, postprocess, tta=tta)
    return path
