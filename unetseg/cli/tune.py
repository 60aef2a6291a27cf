"""unetseg-tune: search a model's instance post-processing on annotated images and store it in the model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from unetseg.evaluation.metrics import instance_scores
from unetseg.evaluation.tune import SEARCH_GRID, predict_probabilities, tune_postprocess
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings
from unetseg.inference.postprocess import to_labels
from unetseg.inference.tiling import TilingConfig
from unetseg.io import find_pairs, pair_name, read_image, to_channels
from unetseg.io.modality import image_features, modality_names
from unetseg.models.checkpoint import CheckpointError, resolve_model, store_postprocess
from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level
from unetseg.spec import label_settings

log = logging.getLogger("unetseg.cli.tune")
PROG = "unetseg-tune"

DESCRIPTION = f"""\
Search the post-processing of CHECKPOINT's instance labels (--output labels) that maximises
the mean DSB score on the annotated images of DATA (DATA/images and DATA/masks, paired by name),
and store it in the checkpoint, where unetseg-predict finds it (its --threshold,
--seed-threshold and --min-size flags still override each value). The model runs once per
image; then each setting is searched over a grid with the others held at their best
(coordinate ascent, as StarDist's optimize_thresholds):
  threshold       foreground probability       {", ".join(map(str, SEARCH_GRID["threshold"]))}
  seed_threshold  seed probability (None: = threshold)  {", ".join(map(str, SEARCH_GRID["seed_threshold"]))}
  min_size        smallest object (pixels)     {", ".join(map(str, SEARCH_GRID["min_size"]))}
Tune on images the model will not be scored on (e.g. --split its split.json --part train).
With --tta the probabilities average the 8 flips and quarter turns of each tile, and the model
stores that too: unetseg-predict then averages them by default (--no-tta turns it off).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-tune."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .ckpt from unetseg-train")
    parser.add_argument("data", type=Path, metavar="DATA", help="folder with images/ and masks/")
    parser.add_argument("--output", type=Path, metavar="PATH", help="write the tuned model here (default: in place)")
    parser.add_argument("--split", type=Path, metavar="JSON", help="a split.json: tune on one part of DATA only")
    parser.add_argument("--part", choices=("train", "val"), default="train", help="the part of --split (train)")
    parser.add_argument("--max-images", type=int, metavar="N", help="at most N images, evenly spread by name")
    parser.add_argument("--dry-run", action="store_true", help="report the best settings, write nothing")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the settings, scores and every trial")
    parser.add_argument("--tile-size", type=int, default=TilingConfig().tile_size, metavar="PIXELS")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="tune on probabilities averaged over the 8 flips and quarter turns of each tile, and "
        "store that, so that unetseg-predict averages them by default (8x the compute)",
    )
    add_verbosity_flags(parser)
    return parser


def select_pairs(data: Path, split: Path | None, part: str, max_images: int | None) -> list[tuple[Path, Path]]:
    """DATA's (image, mask) pairs, restricted to one part of a split and thinned to max_images."""
    pairs = find_pairs(data)
    if split is not None:
        names = set(json.loads(split.read_text())[part])
        pairs = [pair for pair in pairs if pair_name(pair[0], data / "images") in names]
    if not pairs:
        raise ValueError(
            f"{data}: no image/mask pairs to tune on" + (f" in the {part!r} part of {split}" if split else "")
        )
    if max_images and len(pairs) > max_images:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, max_images).round().astype(int)]
    return pairs


def scores_by_modality(cases, names: list[str], settings: dict) -> dict[str, float]:
    """Mean DSB score of `settings` per modality group (see `unetseg.io.modality`)."""
    scores: dict[str, list[float]] = {}
    for (probs, gt), name in zip(cases, names):
        scores.setdefault(name, []).append(instance_scores(to_labels(probs, **settings), gt)["dsb_score"])
    return {name: float(np.mean(values)) for name, values in sorted(scores.items())}


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-tune; returns the exit status (0 done, 2 usage error)."""
    args = build_parser().parse_args(argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    try:
        checkpoint = resolve_model(args.checkpoint)
        model, spec = load_predictor(checkpoint, "cpu")
        if not spec.instances:
            raise ValueError(f"{checkpoint}: predicts {spec.targets!r}, not instances; nothing to tune")
        pairs = select_pairs(args.data, args.split, args.part, args.max_images)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    log.info("%s: predicting %d image(s)", PROG, len(pairs))
    tiling = TilingConfig(
        tile_size=args.tile_size, overlap=min(TilingConfig().overlap, args.tile_size // 4), tta=args.tta
    )
    cases = predict_probabilities(model, spec, pairs, PredictSettings(tiling=tiling))
    groups = modality_names([image_features(to_channels(read_image(image), 3)) for image, _ in pairs])
    result = tune_postprocess(
        cases, start=spec.postprocess, on_trial=lambda settings, score: log.debug("%s -> %.4f", settings, score)
    )
    before = scores_by_modality(cases, groups, label_settings(spec.postprocess))
    after = scores_by_modality(cases, groups, result.settings)
    print(f"{PROG}: {len(pairs)} image(s){' with TTA' if args.tta else ''}, {len(result.trials)} settings tried")
    print(f"  start {spec.postprocess or 'defaults'}: mean DSB score {result.start_score:.4f}")
    print(f"  best  {result.settings}: mean DSB score {result.score:.4f}")
    for name in after:
        count = groups.count(name)
        print(f"    {name} ({count} images): {before[name]:.4f} -> {after[name]:.4f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "images": len(pairs),
                    "tta": args.tta,
                    "start": {"settings": spec.postprocess, "score": result.start_score, "by_modality": before},
                    "best": {"settings": result.settings, "score": result.score, "by_modality": after},
                    "trials": [{"settings": settings, "score": score} for settings, score in result.trials],
                },
                indent=1,
            )
            + "\n"
        )
    if not args.dry_run:
        target = store_postprocess(checkpoint, args.output or checkpoint, result.settings, tta=args.tta)
        print(f"{PROG}: wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
