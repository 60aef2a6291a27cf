"""unetseg-cv: k-fold cross-validation of a training recipe, out-of-fold scores, and the fold ensemble."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from unetseg.evaluation.crossval import (
    ensemble_folds,
    fold_checkpoint,
    format_table,
    out_of_fold,
    score_cross_validation,
    train_folds,
)
from unetseg.inference.loading import load_predictor
from unetseg.models.checkpoint import CheckpointError
from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level

PROG = "unetseg-cv"
log = logging.getLogger("unetseg.cli.cv")

DESCRIPTION = """\
k-fold cross-validation, as nnU-Net does it:

  unetseg-cv train CONFIG DATA --folds 5 --work cv/          train every fold (or --fold I, for shards)
  unetseg-cv score cv/ DATA [--tta]                          out-of-fold scores per image type
  unetseg-cv ensemble cv/ model.ckpt                         one model file of the K final networks

Fold I trains on the images of the other folds (unetseg-train --data.folds K --data.fold I,
stratified by image type) into WORK/fold_I; a finished fold is skipped and an interrupted one
resumed. `score` predicts every image with the final checkpoint (last.ckpt) of the one fold that
did not train on it (never best.ckpt, which those images chose), tunes the post-processing on
these out-of-fold probabilities, and writes WORK/cv.json and WORK/cv.md: Dice, DSB, F1, PQ and
AJI per image type, with the stored post-processing (the honest estimate), with the tuned one,
and for Otsu + watershed on the same images. `ensemble` writes one model file of the K final
networks (predicting with their averaged probabilities) carrying the tuned post-processing.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the folds")
    train.add_argument("config", help="a config file or packaged config name (as unetseg-train --config)")
    train.add_argument("data", type=Path, help="folder with images/ and masks/")
    train.add_argument("--folds", type=int, default=5, help="number of folds (5)")
    train.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable: shards)")
    train.add_argument("--work", type=Path, required=True, help="folder of the fold runs")
    train.epilog = "Options after -- go to unetseg-train, e.g. -- --trainer.max_epochs 10"
    score = commands.add_parser("score", help="out-of-fold predictions and scores")
    score.add_argument("work", type=Path, help="the --work folder of `train`")
    score.add_argument("data", type=Path, help="the folder the folds were trained on")
    score.add_argument("--tta", action="store_true", help="average the 8 flips and quarter turns (8x the compute)")
    score.add_argument("--no-tune", action="store_true", help="score the stored post-processing only")
    score.add_argument("--tile-size", type=int, default=256, metavar="PIXELS")
    ensemble = commands.add_parser("ensemble", help="one model file of the folds' final networks")
    ensemble.add_argument("work", type=Path, help="the --work folder of `train` (and `score`, for its tuning)")
    ensemble.add_argument("output", type=Path, help="the model file to write (.ckpt)")
    for sub in (train, score, ensemble):
        add_verbosity_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-cv; returns the exit status (0 done, 1 a fold failed, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # unetseg-train's own options
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    try:
        if args.command == "train":
            trained = train_folds(args.config, args.data, args.folds, args.work, args.fold, extra)
            print(f"{PROG}: trained fold(s) {trained or 'none (all finished)'} into {args.work}")
        elif args.command == "score":
            cases = out_of_fold(args.work, args.data, args.tta, args.tile_size, lambda name: log.info("%s", name))
            _, spec = load_predictor(fold_checkpoint(args.work, 0), "cpu")
            result = score_cross_validation(cases, spec.postprocess, tune=not args.no_tune)
            result["tta"] = args.tta
            (args.work / "cv.json").write_text(json.dumps(result, indent=1) + "\n")
            table = format_table(result)
            (args.work / "cv.md").write_text(table + "\n")
            print(table)
            print(
                f"{PROG}: {result['images']} images out of fold, {result['seconds_per_image']:.2f} s each; "
                f"wrote {args.work / 'cv.json'} and cv.md"
            )
        else:
            scored = args.work / "cv.json"
            tuning = json.loads(scored.read_text()) if scored.exists() else {}
            settings = (tuning.get("tuned_postprocess") or {}).get("settings")
            path = ensemble_folds(args.work, args.output, settings, tta=bool(tuning.get("tta")))
            print(f"{PROG}: wrote {path}" + (f" with post-processing {settings}" if settings else ""))
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:  # a fold's training failed: its command printed why
        print(f"{PROG}: error: a fold's training failed ({error})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
