"""Segmentation metrics on numpy arrays: foreground Dice/IoU, instance matching, DSB score, panoptic quality,
aggregated Jaccard index, Rand error and VI.

Conventions, shared by every function here:

- Foreground is `label > 0`; a mask may be binary (0/1, 0/255, bool) or hold instance labels.
- Instances: a label image is used as it is; a binary mask (at most one non-zero value) is split
  into connected components (`as_instances`).
- Matching: a predicted and a GT object match when their IoU is *strictly* above the threshold,
  as in the 2018 Data Science Bowl. For thresholds >= 0.5 each object then has at most one
  partner (two objects can't both overlap more than half of a third), so no assignment solver
  is needed, and thresholds below 0.5 are refused.
- Empty images: when pred and GT both have no foreground, Dice, IoU, precision, recall, F1 and
  the DSB score are 1 and the Rand error is 0; when exactly one is empty, they are 0 (errors 1).
  Otherwise a 0/0 ratio (precision with no predicted objects) is 0. VI is not bounded and is
  reported as computed (0 for two empty images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import relabel_sequential

from unetseg.io.labels import CONNECTIVITY, as_instances

DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))  # 0.5, 0.55, ..., 0.95
MATCH_THRESHOLD = 0.5  # for tp/fp/fn, precision, recall and F1

# Per-image values that the summary averages over images, and counts that it adds up.
MEAN_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "f1",
    "dsb_score",
    "pq",
    "sq",
    "rq",
    "aji",
    "adapted_rand_error",
    "vi",
    "vi_split",
    "vi_merge",
)
SUM_KEYS = ("tp", "fp", "fn", "n_pred", "n_gt", "pred_pixels", "gt_pixels", "overlap_pixels")
SCORE_KEYS = MEAN_KEYS + SUM_KEYS  # the keys of a segmentation_scores dict


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    """Refuse a prediction and GT of different shapes."""
    if np.shape(pred) != np.shape(gt):
        raise ValueError(f"prediction and ground truth differ in shape: {np.shape(pred)} vs {np.shape(gt)}")


def _foreground_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """(|pred|, |gt|, |pred & gt|) in foreground pixels."""
    _check_pair(pred, gt)
    pred_fg = np.asarray(pred) > 0
    gt_fg = np.asarray(gt) > 0
    return int(pred_fg.sum()), int(gt_fg.sum()), int(np.count_nonzero(pred_fg & gt_fg))


def _dice(pred_pixels: int, gt_pixels: int, overlap_pixels: int) -> float:
    """2|P&G| / (|P| + |G|), 1 when both are empty."""
    total = pred_pixels + gt_pixels
    return 2.0 * overlap_pixels / total if total else 1.0


def _iou(pred_pixels: int, gt_pixels: int, overlap_pixels: int) -> float:
    """|P&G| / |P or G|, 1 when both are empty."""
    union = pred_pixels + gt_pixels - overlap_pixels
    return overlap_pixels / union if union else 1.0


def foreground_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|) of the foregrounds (label > 0) of two same-shape masks.

    Both empty gives 1.0, exactly one empty gives 0.0.
    """
    return _dice(*_foreground_counts(pred, gt))


def foreground_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index |P & G| / |P | G| of the foregrounds (label > 0); 1.0 when both are empty."""
    return _iou(*_foreground_counts(pred, gt))


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 1..n in ascending order of the original labels (0 stays 0), and n."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "uib":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.reshape(-1), int(relabelled.max(initial=0))


def _contingency(gt_labels: np.ndarray, pred_labels: np.ndarray) -> sparse.csr_array:
    """Pixel counts of every (GT label, predicted label) pair, int64, shape (n_gt + 1, n_pred + 1).

    Row and column 0 are background; the others follow the ascending order of the labels.
    One pass over the pixels: a bincount of pair codes when the dense table is small, a
    sort of the codes (np.unique) when there are many objects.
    """
    _check_pair(pred_labels, gt_labels)
    gt_index, n_gt = _sequential(gt_labels)
    pred_index, n_pred = _sequential(pred_labels)
    shape = (n_gt + 1, n_pred + 1)
    codes = gt_index.astype(np.int64) * shape[1] + pred_index.astype(np.int64)  # uint64 + int64 would be float
    if shape[0] * shape[1] <= max(4 * codes.size, 1 << 16):
        counts = np.bincount(codes, minlength=shape[0] * shape[1])
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(codes, return_counts=True)
    rows, cols = np.divmod(codes, shape[1])
    return sparse.csr_array((counts.astype(np.int64), (rows, cols)), shape=shape)


def _iou_from_table(table: sparse.csr_array) -> sparse.csr_array:
    """IoU of every overlapping (GT object, predicted object) pair, shape (n_gt, n_pred)."""
    gt_area = np.asarray(table.sum(axis=1)).ravel()
    pred_area = np.asarray(table.sum(axis=0)).ravel()
    overlap = table[1:, 1:].tocoo()
    union = gt_area[overlap.row + 1] + pred_area[overlap.col + 1] - overlap.data
    return sparse.csr_array((overlap.data / union, (overlap.row, overlap.col)), shape=overlap.shape)


def instance_matches(pred_labels: np.ndarray, gt_labels: np.ndarray) -> sparse.csr_array:
    """IoU of every pair of predicted and GT objects, as a sparse matrix of shape (n_pred, n_gt).

    Rows are the predicted objects, columns the GT objects, each in ascending order of their
    (non-zero) labels; pairs that don't overlap are absent (IoU 0). Built from one contingency
    table of the two label images, so the cost is one pass over the pixels, whatever the number
    of objects. Use `.toarray()` for a dense matrix.
    """
    return _iou_from_table(_contingency(gt_labels, pred_labels)).T.tocsr()


def _instance_scores_from_iou(iou: sparse.csr_array, thresholds: Sequence[float]) -> dict:
    """tp/fp/fn at MATCH_THRESHOLD, precision, recall, F1 and the DSB score from a (n_gt, n_pred) IoU matrix."""
    n_gt, n_pred = iou.shape
    if n_gt == 0 and n_pred == 0:
        return {
            "tp": 0,
            "fp": 0,
            "fn": 0,
            "n_pred": 0,
            "n_gt": 0,
            "precision": 1.0,
            "recall": 1.0,
            "f1": 1.0,
            "dsb_score": 1.0,
        }
    values = iou.data
    # IoU > t >= 0.5 pairs objects one-to-one, so the number of such pairs is the number of TPs.
    tp = int(np.count_nonzero(values > MATCH_THRESHOLD))
    fp, fn = n_pred - tp, n_gt - tp
    per_threshold = [np.count_nonzero(values > threshold) for threshold in thresholds]
    dsb_score = float(np.mean([hits / (n_pred + n_gt - hits) for hits in per_threshold]))
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_pred": n_pred,
        "n_gt": n_gt,
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_gt if n_gt else 0.0,
        "f1": 2.0 * tp / (2 * tp + fp + fn),
        "dsb_score": dsb_score,
    }


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Thresholds as a tuple, refused when empty or outside [0.5, 1)."""
    thresholds = tuple(float(threshold) for threshold in thresholds)
    if not thresholds or any(not 0.5 <= threshold < 1.0 for threshold in thresholds):
        raise ValueError(f"IoU thresholds must be in [0.5, 1), where matches are one-to-one; got {thresholds}")
    return thresholds


def instance_scores(
    pred_labels: np.ndarray, gt_labels: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS
) -> dict:
    """Object-level scores of a predicted label image against a GT label image.

    Args:
        pred_labels, gt_labels: same-shape integer label images (0 = background). Binary masks are
            taken as one object each; pass them through `as_instances` first to split them.
        thresholds: IoU thresholds for the DSB score, each in [0.5, 1).

    Returns a dict: `tp`, `fp`, `fn` (at IoU > 0.5), `n_pred`, `n_gt`, `precision`, `recall`, `f1`,
    and `dsb_score`, the 2018 Data Science Bowl score: the mean over thresholds t of
    TP(t) / (TP(t) + FP(t) + FN(t)). Both images empty gives 1 for every score; one empty gives 0.
    """
    thresholds = _check_thresholds(thresholds)
    return _instance_scores_from_iou(_iou_from_table(_contingency(gt_labels, pred_labels)), thresholds)


def _panoptic_from_iou(iou: sparse.csr_array) -> dict:
    """Panoptic quality (Kirillov et al. 2019) from a (n_gt, n_pred) IoU matrix: matches at IoU > 0.5,
    SQ the mean IoU of the matches, RQ = TP / (TP + FP/2 + FN/2) (the F1), PQ = SQ * RQ."""
    n_gt, n_pred = iou.shape
    if n_gt == 0 and n_pred == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    matched = iou.data[iou.data > MATCH_THRESHOLD]
    tp = len(matched)
    rq = tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_gt - tp))
    sq = float(matched.mean()) if tp else 0.0
    return {"pq": sq * rq, "sq": sq, "rq": rq}


def _aji_from_table(table: sparse.csr_array) -> float:
    """Aggregated Jaccard index (Kumar et al. 2017) from a contingency table (see `aggregated_jaccard`)."""
    n_gt, n_pred = table.shape[0] - 1, table.shape[1] - 1
    if n_gt == 0 or n_pred == 0:
        return 1.0 if n_gt == n_pred else 0.0
    gt_area = np.asarray(table.sum(axis=1)).ravel()[1:]
    pred_area = np.asarray(table.sum(axis=0)).ravel()[1:]
    overlap = table[1:, 1:].tocoo()
    iou = overlap.data / (gt_area[overlap.row] + pred_area[overlap.col] - overlap.data)
    # Each GT object's best partner: sort by GT, then by IoU descending (then the lower label), keep the first.
    order = np.lexsort((overlap.col, -iou, overlap.row))
    rows, first = np.unique(overlap.row[order], return_index=True)
    best = order[first]
    intersection = float(overlap.data[best].sum())
    union = float((gt_area[rows] + pred_area[overlap.col[best]] - overlap.data[best]).sum())
    union += float(gt_area.sum() - gt_area[rows].sum())  # GT objects that touch no prediction
    unused = np.ones(n_pred, dtype=bool)
    unused[overlap.col[best]] = False
    union += float(pred_area[unused].sum())  # predictions that are nobody's best partner
    return intersection / union


def panoptic_quality(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict:
    """Panoptic quality of a predicted label image against GT labels: {"pq", "sq", "rq"}.

    Objects match one-to-one at IoU > 0.5; SQ is the mean IoU of the matched pairs, RQ is
    TP / (TP + FP/2 + FN/2), and PQ = SQ x RQ = sum of matched IoUs / (TP + FP/2 + FN/2).
    Both images empty gives 1; no match gives 0.
    """
    return _panoptic_from_iou(_iou_from_table(_contingency(gt_labels, pred_labels)))


def aggregated_jaccard(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Aggregated Jaccard index (AJI) of a predicted label image against GT labels.

    Each GT object is paired with the predicted object of highest IoU with it (a prediction may
    be the partner of several GT objects, as in Kumar et al. 2017); AJI = sum of the pairs'
    intersections / (sum of the pairs' unions + the areas of GT objects with no overlapping
    prediction + the areas of predictions that are no GT object's partner). Unlike the DSB
    score, it has no IoU threshold: a merge or a split costs in proportion to its pixels.
    Both images empty gives 1; exactly one empty gives 0.
    """
    return _aji_from_table(_contingency(gt_labels, pred_labels))


def _rand_and_vi(gt_labels: np.ndarray, pred_labels: np.ndarray, table: sparse.csr_array) -> dict:
    """Adapted Rand error (GT background ignored, as SNEMI3D) and VI (all pixels) from their contingency table."""
    gt_foreground = table[1:]
    gt_empty, pred_empty = gt_foreground.nnz == 0, table[:, 1:].nnz == 0
    if gt_empty or pred_empty:
        # No GT object leaves 0/0; an empty prediction would count as one perfect "background segment".
        rand_error = 0.0 if gt_empty and pred_empty else 1.0
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            rand_error = float(adapted_rand_error(table=gt_foreground)[0])
        # NaN only when every GT object and every predicted piece of GT is a single pixel: no error.
        rand_error = 0.0 if np.isnan(rand_error) else rand_error
    probabilities = (table / table.sum()).tocsr()
    # skimage reads only the table, but checks the shapes of the images, so it needs them too.
    vi_split, vi_merge = variation_of_information(gt_labels, pred_labels, table=probabilities)
    # Identical partitions give +-1e-17 from rounding; report them as the exact 0.
    vi_split, vi_merge = (float(value) if value > 1e-12 else 0.0 for value in (vi_split, vi_merge))
    return {"adapted_rand_error": rand_error, "vi": vi_split + vi_merge, "vi_split": vi_split, "vi_merge": vi_merge}


def segmentation_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float] = DSB_THRESHOLDS,
    connectivity: int = CONNECTIVITY,
) -> dict:
    """Every metric for one image: foreground, instance and membrane-style scores.

    Args:
        pred, gt: same-shape masks, binary or instance labels; binary ones are split into
            connected components (`as_instances` with this `connectivity`) for the object scores.
        thresholds: IoU thresholds of the DSB score, each in [0.5, 1).
        connectivity: neighbourhood for splitting binary masks, 1 (4-neighbours) or 2 (8) in 2D.

    Returns a flat dict of plain Python numbers:
        `dice`, `iou`: foreground (label > 0) overlap;
        `tp`, `fp`, `fn`, `n_pred`, `n_gt`, `precision`, `recall`, `f1`, `dsb_score`: as `instance_scores`;
        `pq`, `sq`, `rq`: panoptic quality and its factors (`panoptic_quality`);
        `aji`: aggregated Jaccard index (`aggregated_jaccard`);
        `adapted_rand_error`: 1 - Rand F-score over GT foreground pixels (skimage, SNEMI3D);
        `vi` = `vi_split` + `vi_merge`: variation of information over all pixels (skimage), with
            `vi_split` = H(pred | GT) (over-segmentation) and `vi_merge` = H(GT | pred);
        `pred_pixels`, `gt_pixels`, `overlap_pixels`: foreground counts, for pooling over images.
    """
    thresholds = _check_thresholds(thresholds)
    pred_pixels, gt_pixels, overlap_pixels = _foreground_counts(pred, gt)
    gt_labels, pred_labels = as_instances(gt, connectivity), as_instances(pred, connectivity)
    table = _contingency(gt_labels, pred_labels)
    iou = _iou_from_table(table)
    return {
        "dice": _dice(pred_pixels, gt_pixels, overlap_pixels),
        "iou": _iou(pred_pixels, gt_pixels, overlap_pixels),
        **_instance_scores_from_iou(iou, thresholds),
        **_panoptic_from_iou(iou),
        "aji": _aji_from_table(table),
        **_rand_and_vi(gt_labels, pred_labels, table),
        "pred_pixels": pred_pixels,
        "gt_pixels": gt_pixels,
        "overlap_pixels": overlap_pixels,
    }


def summarize(per_image: Sequence[dict]) -> dict:
    """Overall scores of a list of `segmentation_scores` dicts.

    Returns `images` (their number), the mean over images of each score in MEAN_KEYS (None when
    there are no images), the sum of each count in SUM_KEYS, and `pooled_dice`, the foreground
    Dice of all pixels of all images together (large images weigh more than in the mean).
    """
    summary: dict = {"images": len(per_image)}
    for key in MEAN_KEYS:
        summary[key] = float(np.mean([scores[key] for scores in per_image])) if per_image else None
    for key in SUM_KEYS:
        summary[key] = int(sum(scores[key] for scores in per_image))
    summary["pooled_dice"] = (
        _dice(summary["pred_pixels"], summary["gt_pixels"], summary["overlap_pixels"]) if per_image else None
    )
    return summary
