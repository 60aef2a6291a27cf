"""Scoring a folder of predicted masks against its ground truth: pairing, per-image scores, summaries and
their reports (table, JSON, CSV), by image type. `unetseg-evaluate` is its command line."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unetseg.evaluation.metrics import (
    CONNECTIVITY,
    DSB_THRESHOLDS,
    MATCH_THRESHOLD,
    SCORE_KEYS,
    segmentation_scores,
    summarize,
)
from unetseg.inference.overlay import OVERLAY_SUFFIX
from unetseg.inference.sinks import OUTPUTS
from unetseg.io import (
    IMAGE_SUFFIXES,
    DuplicateNameError,
    ImageReadError,
    atomic_output,
    find_images,
    is_image_file,
    read_image,
    to_channels,
)
from unetseg.io.files import image_stem
from unetseg.io.modality import cluster_name, image_features
from unetseg.io.volumes import read_mask

PROG = "unetseg-evaluate"

MAX_TABLE_ROWS = 25  # more images than this: the table shows only the summary
TABLE_COLUMNS = (
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("precision", "Prec"),
    ("recall", "Rec"),
    ("f1", "F1"),
    ("dsb_score", "DSB"),
    ("pq", "PQ"),
    ("aji", "AJI"),
    ("adapted_rand_error", "ARand"),
    ("vi", "VI"),
)


class UsageError(Exception):
    """A problem with the command line or the folders given; exit status 2."""


@dataclass
class Evaluation:
    """Scores of the paired images and every file that could not be scored, with the reason."""

    scores: dict[str, dict] = field(default_factory=dict)  # name -> {"pred", "gt", metric...}
    missing_predictions: list[dict] = field(default_factory=list)  # {"image", "gt"}
    predictions_without_gt: list[dict] = field(default_factory=list)  # {"image", "pred"}
    shape_mismatches: list[dict] = field(default_factory=list)  # {"image", "pred", "gt", "pred_shape", "gt_shape"}
    unreadable: list[dict] = field(default_factory=list)  # {"image", "pred", "gt", "errors"}
    pixels: dict[str, int] = field(default_factory=dict)  # name -> pixels (voxels) of the scored image

    @property
    def failed(self) -> bool:
        """True when some GT image could not be scored."""
        return bool(self.missing_predictions or self.shape_mismatches or self.unreadable)

    def problems(self) -> dict:
        """The files that were not scored, by reason, for the JSON report."""
        return {
            "missing_predictions": self.missing_predictions,
            "predictions_without_gt": self.predictions_without_gt,
            "shape_mismatches": self.shape_mismatches,
            "unreadable": self.unreadable,
        }


def find_masks(root: Path, role: str) -> dict[str, Path]:
    """Image files under `root` keyed by relative sub-folder + name without suffix; a file is keyed by its stem."""
    if root.is_file():
        if not is_image_file(root):
            raise UsageError(f"{role} {root}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        return {image_stem(root): root}
    if not root.is_dir():
        raise UsageError(f"{role} {root}: no such file or folder")
    try:
        files = find_images(root)
    except DuplicateNameError as error:
        raise UsageError(f"{role}: {error.first} and {error.second} have the same name; keep one of them") from None
    if not files:
        raise UsageError(f"{role} {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    return files


def without_overlays(files: dict[str, Path]) -> dict[str, Path]:
    """Drop the quality-control pictures `unetseg-predict --overlay` writes beside its outputs
    (`<stem>_overlay.png` next to `<stem>`): they are not predictions."""
    return {
        name: path
        for name, path in files.items()
        if not (path.name.endswith(OVERLAY_SUFFIX) and name.removesuffix(Path(OVERLAY_SUFFIX).stem) in files)
    }


SCORED_OUTPUTS = ("labels", "mask")  # of the several outputs of one image, the one scored, in order of preference


def named_by_image(pred_files: dict[str, Path], gt_names) -> dict[str, Path]:
    """Key the outputs of a several-output prediction (`<name>_labels`, `<name>_mask`,
    `<name>_prob`) by their image's name: labels are scored, else the mask; the others are
    outputs of the same image, not predictions without GT. A file named exactly like its GT wins."""
    pred_files = dict(pred_files)
    for name in gt_names:
        if name in pred_files:
            continue
        outputs = {kind: f"{name}_{kind}" for kind in OUTPUTS if f"{name}_{kind}" in pred_files}
        scored = next((kind for kind in SCORED_OUTPUTS if kind in outputs), None)
        if scored is None:
            continue
        pred_files[name] = pred_files[outputs[scored]]
        for key in outputs.values():
            del pred_files[key]
    return pred_files


def pair_masks(pred_root: Path, gt_root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Prediction and GT files keyed by name; two single files pair whatever their names."""
    pred_files, gt_files = find_masks(pred_root, "PRED"), find_masks(gt_root, "GT")
    pred_files = without_overlays(named_by_image(pred_files, gt_files))
    if pred_root.is_file() and gt_root.is_file():
        pred_files = {name: pred_root for name in gt_files}
    return pred_files, gt_files


def _read_pair(name: str, pred_path: Path, gt_path: Path, evaluation: Evaluation):
    """The (pred, gt) labels of one image, or None after naming each file that can't be read."""
    labels, errors = [], []
    for path in (pred_path, gt_path):
        try:
            labels.append(read_mask(path))
        except ImageReadError as error:
            errors.append(str(error))
            print(f"error: unreadable: {error}", file=sys.stderr)
    if errors:
        evaluation.unreadable.append({"image": name, "pred": str(pred_path), "gt": str(gt_path), "errors": errors})
        return None
    return labels


def evaluate(pred_files: dict[str, Path], gt_files: dict[str, Path]) -> Evaluation:
    """Score every GT image against its prediction; name on stderr each file that can't be scored."""
    evaluation = Evaluation()
    for name, gt_path in sorted(gt_files.items()):
        pred_path = pred_files.get(name)
        if pred_path is None:
            evaluation.missing_predictions.append({"image": name, "gt": str(gt_path)})
            print(f"error: missing prediction: GT {gt_path} has no prediction named {name}.*", file=sys.stderr)
            continue
        labels = _read_pair(name, pred_path, gt_path, evaluation)
        if labels is None:
            continue
        pred, gt = labels
        if pred.shape != gt.shape:
            evaluation.shape_mismatches.append(
                {
                    "image": name,
                    "pred": str(pred_path),
                    "gt": str(gt_path),
                    "pred_shape": list(pred.shape),
                    "gt_shape": list(gt.shape),
                }
            )
            print(
                f"error: shape mismatch: prediction {pred_path} is {pred.shape}, GT {gt_path} is {gt.shape}",
                file=sys.stderr,
            )
            continue
        try:
            scores = segmentation_scores(pred, gt)
        except (ValueError, MemoryError) as error:  # one bad pair must not lose the report of the others
            message = f"{pred_path} against {gt_path}: cannot score ({type(error).__name__}: {error})"
            evaluation.unreadable.append(
                {"image": name, "pred": str(pred_path), "gt": str(gt_path), "errors": [message]}
            )
            print(f"error: {message}", file=sys.stderr)
            continue
        evaluation.scores[name] = {"pred": str(pred_path), "gt": str(gt_path), **scores}
        evaluation.pixels[name] = int(gt.size)
    for name, pred_path in sorted(pred_files.items()):
        if name not in gt_files:
            evaluation.predictions_without_gt.append({"image": name, "pred": str(pred_path)})
            print(f"warning: no ground truth: prediction {pred_path} has no GT named {name}.*", file=sys.stderr)
    return evaluation


BASELINES = ("all_foreground", "all_background")  # trivial predictions every model must beat


def trivial_baselines(evaluation: Evaluation) -> dict[str, dict[str, float]] | None:
    """Dice (mean over images, and pooled) of predicting every pixel foreground, or every pixel background,
    scored as the predictions are (both empty scores 1, exactly one empty 0); None when nothing was scored."""
    if not evaluation.scores:
        return None
    foreground = [evaluation.scores[name]["gt_pixels"] for name in evaluation.scores]
    pixels = [evaluation.pixels[name] for name in evaluation.scores]
    everything = [2 * f / (f + n) if f else 0.0 for f, n in zip(foreground, pixels)]
    nothing = [0.0 if f else 1.0 for f in foreground]
    total_foreground, total = sum(foreground), sum(pixels)
    return {
        "all_foreground": {
            "dice": float(np.mean(everything)),
            "pooled_dice": 2 * total_foreground / (total_foreground + total),
        },
        "all_background": {"dice": float(np.mean(nothing)), "pooled_dice": 0.0 if total_foreground else 1.0},
    }


def baseline_warning(summary: dict, baselines: dict | None) -> str | None:
    """A warning when the predictions' mean Dice does not beat a trivial baseline's; None when it does."""
    if not baselines or summary.get("dice") is None:
        return None
    kind, scores = max(baselines.items(), key=lambda item: item[1]["dice"])
    if summary["dice"] > scores["dice"]:
        return None
    return (
        f"the predictions' mean Dice {summary['dice']:.3f} does not beat predicting every pixel "
        f"{kind.removeprefix('all_')} ({scores['dice']:.3f}): they are no better than the pixel counts"
    )


def _format_row(label: str, scores: dict, width: int) -> str:
    """One table row: the label, then each score with 3 decimals."""
    values = "".join(f"{scores[key]:>7.3f}" for key, _ in TABLE_COLUMNS)
    return f"{label:<{width}}{values}"


def format_report(evaluation: Evaluation, summary: dict) -> str:
    """The stdout report: per-image rows when there are few, then the mean, pooled Dice and counts."""
    names = list(evaluation.scores)
    width = max([len(name) for name in names] + [len("mean of 000 images")]) + 2
    header = f"{'image':<{width}}" + "".join(f"{title:>7}" for _, title in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    if len(names) <= MAX_TABLE_ROWS:
        lines += [_format_row(name, evaluation.scores[name], width) for name in names]
    else:
        lines.append(f"({len(names)} images: per-image rows in --per-image CSV or --json)")
    if names:
        lines += ["-" * len(header), _format_row(f"mean of {len(names)} images", summary, width)]
        lines.append(
            f"pooled Dice (all pixels): {summary['pooled_dice']:.3f}   objects: {summary['n_gt']} GT, "
            f"{summary['n_pred']} predicted; TP {summary['tp']}, FP {summary['fp']}, FN {summary['fn']} "
            f"at IoU > {MATCH_THRESHOLD}"
        )
        baselines = trivial_baselines(evaluation)
        lines.append(
            f"trivial baselines, Dice (mean / pooled): the predictions {summary['dice']:.3f} / "
            f"{summary['pooled_dice']:.3f}; "
            + ", ".join(
                f"{kind.replace('_', ' ')} {scores['dice']:.3f} / {scores['pooled_dice']:.3f}"
                for kind, scores in baselines.items()
            )
        )
    else:
        lines.append("no image was scored")
    lines.append(
        f"not scored: {len(evaluation.missing_predictions)} GT without prediction, "
        f"{len(evaluation.shape_mismatches)} shape mismatch, {len(evaluation.unreadable)} unreadable; "
        f"{len(evaluation.predictions_without_gt)} prediction(s) without GT"
    )
    return "\n".join(lines)


def modality_groups(names: list[str], images: Path) -> dict[str, list[str]]:
    """Scored image names by the modality of their input image in `images` (see `unetseg.io.modality`);
    names without an input image are grouped under "no image"."""
    files = find_masks(images, "--by-modality")
    groups: dict[str, list[str]] = {}
    for name in names:
        path = files.get(name)
        group = cluster_name(image_features(to_channels(read_image(path), 3))) if path else "no image"
        groups.setdefault(group, []).append(name)
    return dict(sorted(groups.items()))


def format_groups(evaluation: Evaluation, groups: dict[str, list[str]]) -> tuple[str, dict]:
    """Table rows of the mean scores of each group, and the summaries by group."""
    width = max([len(f"{group} ({len(names)})") for group, names in groups.items()] + [len("group")]) + 2
    lines, summaries = [], {}
    for group, names in groups.items():
        summaries[group] = summarize([evaluation.scores[name] for name in names])
        lines.append(_format_row(f"{group} ({len(names)})", summaries[group], width))
    header = f"{'group (images)':<{width}}" + "".join(f"{title:>7}" for _, title in TABLE_COLUMNS)
    return "\n".join([header, "-" * len(header), *lines]), summaries


def write_json(path: Path, evaluation: Evaluation, summary: dict, pred_root: Path, gt_root: Path) -> None:
    """Write the summary, the per-image scores and the unscored files as one JSON document."""
    document = {
        "pred": str(pred_root),
        "gt": str(gt_root),
        "settings": {
            "match_threshold": MATCH_THRESHOLD,
            "dsb_thresholds": list(DSB_THRESHOLDS),
            "connectivity": CONNECTIVITY,
        },
        "summary": summary,
        "problems": evaluation.problems(),
        "images": evaluation.scores,
    }
    with atomic_output(path, suffix=".tmp.json") as temporary:
        temporary.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, evaluation: Evaluation) -> None:
    """Write one row per image: scored ones with their metrics, the others with the reason in `status`."""
    rows = [{"image": name, "status": "ok", **scores} for name, scores in evaluation.scores.items()]
    for status, items in (
        ("missing prediction", evaluation.missing_predictions),
        ("shape mismatch", evaluation.shape_mismatches),
        ("unreadable", evaluation.unreadable),
        ("no ground truth", evaluation.predictions_without_gt),
    ):
        rows += [
            {"image": item["image"], "status": status, "pred": item.get("pred"), "gt": item.get("gt")} for item in items
        ]
    with atomic_output(path, suffix=".tmp.csv") as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "status", "pred", "gt", *SCORE_KEYS])
        writer.writeheader()
        writer.writerows(rows)
