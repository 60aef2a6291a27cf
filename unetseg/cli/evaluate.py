"""unetseg-evaluate: score predicted masks against ground-truth masks, per image and overall."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from unetseg.evaluation.evaluate import (
    UsageError,
    baseline_warning,
    evaluate,
    format_groups,
    format_report,
    modality_groups,
    pair_masks,
    trivial_baselines,
    write_csv,
    write_json,
)
from unetseg.evaluation.metrics import (
    DSB_THRESHOLDS,
    MATCH_THRESHOLD,
    summarize,
)
from unetseg.io import (
    ImageReadError,
)
from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level

PROG = "unetseg-evaluate"
DESCRIPTION = f"""\
Score predicted masks (PRED) against ground-truth masks (GT). Each is a folder, searched
recursively, or a single file. Files are paired by sub-folder and name without suffix, so
pred/a/img1.tif scores against gt/a/img1.png; the outputs of `unetseg-predict --output labels
prob` (img1_labels.tif, img1_prob.tif) score as img1 by their labels, else their mask. Masks
may be binary (0/1, 0/255) or instance labels (8 to 64 bits, kept exact); binary masks are
split into 4-connected components for the object scores. ZYX TIFF stacks and NIfTI volumes
(.nii, .nii.gz) are scored in 3-D: objects are matched by voxel IoU, binary masks split into
6-connected components.
JPEG masks are refused: lossy compression changes label values.

Per image and as the mean over images: foreground Dice and IoU (label > 0); object precision,
recall and F1 (a match is IoU > {MATCH_THRESHOLD}); the 2018 Data Science Bowl score, the mean
of TP / (TP + FP + FN) over IoU thresholds {", ".join(map(str, DSB_THRESHOLDS))};
panoptic quality (PQ = mean IoU of matches x F1) and the aggregated Jaccard index (AJI);
adapted Rand error and variation of information (scikit-image). Also the pooled Dice of all
pixels of all images.
Both masks empty scores 1 (errors 0); exactly one empty scores 0 (Rand error 1).
"""

EPILOG = """\
exit status: 0 when every GT image was scored; 1 when a GT image has no prediction, a shape
differs or a file can't be read (each is named on stderr, the rest is still scored and
written); 2 for usage errors (a missing folder, no image files, two files with one name).
Predictions without a GT file are named on stderr but don't change the exit status.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-evaluate."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pred", type=Path, metavar="PRED", help="predicted masks: a folder (recursive) or a file")
    parser.add_argument("gt", type=Path, metavar="GT", help="ground-truth masks: a folder (recursive) or a file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write summary, per-image scores and unscored files")
    parser.add_argument("--per-image", type=Path, metavar="CSV", help="write one CSV row per image")
    parser.add_argument(
        "--by-modality",
        type=Path,
        metavar="IMAGES",
        help="also report the mean scores per image type (fluorescence, grey brightfield, colour), "
        "from the input images in this folder, paired by name",
    )
    add_verbosity_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-evaluate; returns the exit status (0 all scored, 1 some GT image not scored, 2 usage error)."""
    args = build_parser().parse_args(argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    started = time.perf_counter()
    try:
        pred_files, gt_files = pair_masks(args.pred, args.gt)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    evaluation = evaluate(pred_files, gt_files)
    summary = summarize(list(evaluation.scores.values()))
    print(format_report(evaluation, summary))
    summary["baselines"] = trivial_baselines(evaluation)
    warning = baseline_warning(summary, summary["baselines"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.by_modality:
        try:
            table, by_modality = format_groups(evaluation, modality_groups(list(evaluation.scores), args.by_modality))
        except (UsageError, ImageReadError) as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        summary["by_modality"] = by_modality
        print(table)
    print(f"{len(gt_files)} GT image(s) in {time.perf_counter() - started:.1f} s")
    try:
        if args.json:
            write_json(args.json, evaluation, summary, args.pred, args.gt)
        if args.per_image:
            write_csv(args.per_image, evaluation)
    except OSError as error:
        print(f"{PROG}: error: cannot write the report: {error}", file=sys.stderr)
        return 2
    if evaluation.failed:
        print(
            f"{PROG}: {len(evaluation.missing_predictions)} GT image(s) without prediction, "
            f"{len(evaluation.shape_mismatches)} shape mismatch(es), {len(evaluation.unreadable)} unreadable file(s)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
