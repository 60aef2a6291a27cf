"""Metrics on small masks whose expected values are worked out by hand in the comments."""

import numpy as np
import pytest

from unetseg.evaluation.metrics import (
    SCORE_KEYS,
    aggregated_jaccard,
    as_instances,
    foreground_dice,
    foreground_iou,
    instance_matches,
    instance_scores,
    panoptic_quality,
    segmentation_scores,
    summarize,
)


def entropy(*probabilities):
    """Shannon entropy in bits of a distribution."""
    return -sum(p * np.log2(p) for p in probabilities)


@pytest.fixture
def three_nuclei():
    """A 20x20 label image with objects 1, 2, 7 of 16, 9 and 4 pixels."""
    labels = np.zeros((20, 20), np.int32)
    labels[1:5, 1:5] = 1
    labels[10:13, 10:13] = 2
    labels[15:17, 2:4] = 7
    return labels


def test_perfect_prediction_scores_best(three_nuclei):
    scores = segmentation_scores(three_nuclei, three_nuclei)
    assert scores["dice"] == scores["iou"] == 1.0
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3, 0, 0)
    assert scores["precision"] == scores["recall"] == scores["f1"] == scores["dsb_score"] == 1.0
    assert scores["adapted_rand_error"] == 0.0
    assert scores["vi"] == scores["vi_split"] == scores["vi_merge"] == 0.0
    assert (scores["pred_pixels"], scores["gt_pixels"], scores["overlap_pixels"]) == (29, 29, 29)
    assert set(scores) == set(SCORE_KEYS)
    assert all(type(value) in (int, float) for value in scores.values())


def test_other_label_values_for_the_same_objects_are_perfect(three_nuclei):
    relabelled = np.select([three_nuclei == 1, three_nuclei == 2, three_nuclei == 7], [50, 3, 9], 0)
    scores = segmentation_scores(relabelled, three_nuclei)
    assert scores["dsb_score"] == 1.0 and scores["tp"] == 3 and scores["vi"] == 0.0


def test_both_empty_scores_one():
    empty = np.zeros((8, 8), np.uint8)
    scores = segmentation_scores(empty, empty)
    assert foreground_dice(empty, empty) == foreground_iou(empty, empty) == 1.0
    assert scores["dice"] == scores["iou"] == scores["dsb_score"] == scores["f1"] == 1.0
    assert scores["precision"] == scores["recall"] == 1.0
    assert (scores["tp"], scores["fp"], scores["fn"], scores["n_pred"], scores["n_gt"]) == (0, 0, 0, 0, 0)
    assert scores["adapted_rand_error"] == 0.0 and scores["vi"] == 0.0


def test_empty_prediction_scores_zero(three_nuclei):
    scores = segmentation_scores(np.zeros_like(three_nuclei), three_nuclei)
    assert scores["dice"] == scores["iou"] == scores["dsb_score"] == scores["f1"] == 0.0
    assert scores["precision"] == scores["recall"] == 0.0
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 0, 3)
    assert scores["adapted_rand_error"] == 1.0
    # GT given an all-background prediction: 371 background, 16 + 9 + 4 object pixels.
    assert scores["vi_merge"] == pytest.approx(entropy(371 / 400, 16 / 400, 9 / 400, 4 / 400))
    assert scores["vi_split"] == 0.0


def test_empty_ground_truth_scores_zero(three_nuclei):
    scores = segmentation_scores(three_nuclei, np.zeros_like(three_nuclei))
    assert scores["dice"] == scores["dsb_score"] == scores["f1"] == scores["precision"] == scores["recall"] == 0.0
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 3, 0)
    assert scores["adapted_rand_error"] == 1.0
    assert scores["vi_split"] == pytest.approx(entropy(371 / 400, 16 / 400, 9 / 400, 4 / 400))


def test_shifted_square():
    # A 10x10 square and the same square 2 columns to the right: overlap 10 x 8 = 80, union 120.
    gt = np.zeros((30, 30), np.uint8)
    gt[5:15, 5:15] = 1
    pred = np.zeros_like(gt)
    pred[5:15, 7:17] = 1
    assert foreground_iou(pred, gt) == pytest.approx(80 / 120)
    assert foreground_dice(pred, gt) == pytest.approx(2 * 80 / 200)
    np.testing.assert_allclose(instance_matches(pred, gt).toarray(), [[80 / 120]])
    scores = instance_scores(pred, gt)
    # IoU 0.667 is above 0.5, 0.55, 0.6, 0.65 (TP/(TP+FP+FN) = 1) and not above the 6 others (0/2).
    assert scores["dsb_score"] == pytest.approx(4 / 10)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 0)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 1.0


def test_shift_by_half_is_no_match():
    # Shifted by 5 columns: IoU 50 / 150 = 1/3, below every threshold.
    gt = np.zeros((30, 30), np.uint8)
    gt[5:15, 5:15] = 1
    pred = np.roll(gt, 5, axis=1)
    scores = instance_scores(pred, gt)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 1, 1)
    assert scores["dsb_score"] == 0.0 and scores["f1"] == 0.0


def unequal_pair():
    """A 4x10 image: object A of 4x5 = 20 pixels, object B of 4x3 = 12 touching it, 8 background pixels."""
    labels = np.zeros((4, 10), np.int32)
    labels[:, 0:5] = 1
    labels[:, 5:8] = 2
    return labels


def test_merged_objects():
    gt = unequal_pair()
    pred = (gt > 0).astype(np.uint8)  # one 32-pixel object covering both
    np.testing.assert_allclose(instance_matches(pred, gt).toarray(), [[20 / 32, 12 / 32]])
    scores = segmentation_scores(pred, gt)
    # A matches (IoU 0.625), B doesn't: TP 1, FP 0, FN 1 at 0.5.
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    # 0.625 > 0.5, 0.55, 0.6: 1 / (1 + 0 + 1) each; 0 / (0 + 1 + 2) at the other 7 thresholds.
    assert scores["dsb_score"] == pytest.approx(3 * 0.5 / 10)
    assert scores["dice"] == 1.0
    # A merge only: GT is uncertain inside the 32-pixel object (20:12), the prediction never.
    assert scores["vi_split"] == 0.0
    assert scores["vi_merge"] == pytest.approx(32 / 40 * entropy(20 / 32, 12 / 32))
    # Rand over GT pixels: same-pair counts sum(n^2 - n): joint 380 + 132 = 512, GT 512, pred 992.
    assert scores["adapted_rand_error"] == pytest.approx(1 - 512 / (0.5 * 512 + 0.5 * 992))


def test_split_object():
    pred = unequal_pair()
    gt = (pred > 0).astype(np.uint8)  # one 32-pixel object, predicted as two
    scores = segmentation_scores(pred, gt)
    # The 20-pixel piece matches (IoU 0.625), the 12-pixel one is a false positive.
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 0)
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0 and scores["f1"] == pytest.approx(2 / 3)
    assert scores["dsb_score"] == pytest.approx(3 * 0.5 / 10)
    assert scores["vi_merge"] == 0.0
    assert scores["vi_split"] == pytest.approx(32 / 40 * entropy(20 / 32, 12 / 32))
    assert scores["adapted_rand_error"] == pytest.approx(1 - 512 / (0.5 * 512 + 0.5 * 992))


def test_match_is_strictly_above_threshold():
    # Two halves of an 8-pixel object: IoU exactly 0.5 each, which is not a match (DSB: "above").
    gt = np.zeros((2, 4), np.uint8)
    gt[:] = 1
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    scores = instance_scores(pred, gt)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 2, 1)


def test_instance_matches_orders_by_label():
    gt = np.array([[5, 5, 0, 100, 100, 100]])
    pred = np.array([[0, 3, 3, 3, 9, 9]])
    iou = instance_matches(pred, gt).toarray()
    # pred 3 vs GT 5: 1 / 4; pred 3 vs GT 100: 1 / 5; pred 9 vs GT 100: 2 / 3.
    np.testing.assert_allclose(iou, [[1 / 4, 1 / 5], [0, 2 / 3]])


def test_many_objects_use_the_same_counts():
    # 10 000 objects of 2x2 pixels: too many pairs for a dense table, so the sort path counts them.
    gt = np.arange(1, 10_001).reshape(100, 100).repeat(2, axis=0).repeat(2, axis=1)
    permutation = np.random.default_rng(0).permutation(10_001)
    permutation[permutation == 0] = permutation[0]
    permutation[0] = 0
    pred = permutation[gt]
    iou = instance_matches(pred, gt)
    assert iou.shape == (10_000, 10_000) and iou.nnz == 10_000
    assert np.all(iou.data == 1.0)
    assert instance_scores(pred, gt)["tp"] == 10_000
    shifted = instance_scores(np.roll(pred, 1, axis=1), gt)
    # Each 2x2 object shifted by one column keeps 2 of 4 pixels of its GT: IoU 2/6, no match.
    assert shifted["tp"] == 0 and shifted["fp"] == shifted["fn"] == 10_000


def test_binary_masks_are_split_by_connectivity():
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 255
    mask[2:4, 2:4] = 255  # touches the first square only at a corner
    mask[5, 5] = 255
    four = as_instances(mask)
    assert four.max() == 3 and len(np.unique(four)) == 4
    assert np.array_equal(four > 0, mask > 0)
    eight = as_instances(mask, connectivity=2)
    assert eight.max() == 2 and eight[0, 0] == eight[3, 3] != eight[5, 5]
    assert as_instances(mask.astype(bool)).max() == 3


def test_label_images_are_kept():
    labels = np.array([[0, 4, 4], [2, 0, 4]], np.uint16)
    assert as_instances(labels) is labels


def test_binary_ground_truth_against_label_prediction(three_nuclei):
    binary_gt = np.where(three_nuclei > 0, 255, 0).astype(np.uint8)
    scores = segmentation_scores(three_nuclei, binary_gt)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3, 0, 0) and scores["dsb_score"] == 1.0
    # Without splitting, the binary GT would be one object and all three predictions would miss it.
    unsplit = instance_scores(three_nuclei, binary_gt)
    assert (unsplit["tp"], unsplit["fp"], unsplit["fn"]) == (1, 2, 0)


def test_shape_mismatch_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match=r"\(4, 4\) vs \(4, 5\)"):
        segmentation_scores(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="thresholds"):
        instance_scores(np.ones((2, 2), int), np.ones((2, 2), int), thresholds=(0.3,))
    with pytest.raises(ValueError, match="negative"):
        instance_matches(np.full((2, 2), -1), np.ones((2, 2), int))


def test_summarize_means_and_pooled_dice():
    full = np.ones((10, 1), np.uint8)  # 10 pixels, perfect: Dice 1
    gt_large = np.ones((30, 1), np.uint8)  # 30 GT pixels, nothing predicted: Dice 0
    per_image = [segmentation_scores(full, full), segmentation_scores(np.zeros_like(gt_large), gt_large)]
    summary = summarize(per_image)
    assert summary["images"] == 2
    assert summary["dice"] == 0.5 and summary["dsb_score"] == 0.5
    assert summary["pooled_dice"] == pytest.approx(2 * 10 / (10 + 40))
    assert (summary["tp"], summary["fn"], summary["n_gt"]) == (1, 1, 2)
    assert summarize([])["dice"] is None and summarize([])["images"] == 0


# --- Panoptic quality and aggregated Jaccard index, against hand-computed cases ---------------------


def two_halves() -> np.ndarray:
    labels = np.zeros((4, 8), np.int32)
    labels[:, :4] = 1
    labels[:, 4:] = 2
    return labels


def test_pq_and_aji_of_a_perfect_prediction_are_one():
    labels = two_halves()
    assert panoptic_quality(labels * 7, labels) == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    assert aggregated_jaccard(labels * 7, labels) == 1.0


def test_a_merge_costs_pq_everything_and_aji_half():
    # Two 16-pixel GT objects, one 32-pixel prediction: each IoU is exactly 0.5 (not a match).
    # AJI: both GT objects pair with the one prediction: (16 + 16) / (32 + 32).
    merged = (two_halves() > 0).astype(np.int32)
    assert panoptic_quality(merged, two_halves()) == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert aggregated_jaccard(merged, two_halves()) == pytest.approx(0.5)


def test_pq_and_aji_of_a_shrunken_object_and_a_false_one():
    gt = np.zeros((8, 8), np.int32)
    gt[:4, :4] = 1  # 16 pixels
    pred = np.zeros((8, 8), np.int32)
    pred[:4, :3] = 1  # 12 pixels inside it: IoU 0.75
    pred[6:8, 6:8] = 2  # 4 pixels of nothing
    # TP 1 (IoU 0.75), FP 1, FN 0: SQ 0.75, RQ 1 / (1 + 0.5), PQ 0.5.
    scores = panoptic_quality(pred, gt)
    assert scores["sq"] == pytest.approx(0.75)
    assert scores["rq"] == pytest.approx(2 / 3)
    assert scores["pq"] == pytest.approx(0.5)
    # AJI: 12 / (16 + 4 of the unpaired prediction).
    assert aggregated_jaccard(pred, gt) == pytest.approx(0.6)


def test_a_split_object_pairs_with_one_half_in_aji():
    gt = np.zeros((4, 4), np.int32)
    gt[:] = 1
    pred = np.zeros((4, 4), np.int32)
    pred[:, :2], pred[:, 2:] = 1, 2  # two 8-pixel halves, IoU 0.5 each
    assert panoptic_quality(pred, gt)["pq"] == 0.0  # TP 0, FP 2, FN 1
    # The first half pairs (ties go to the lower label): 8 / (16 + 8 of the other half).
    assert aggregated_jaccard(pred, gt) == pytest.approx(1 / 3)


def test_pq_and_aji_of_empty_images_and_in_segmentation_scores():
    empty = np.zeros((4, 8), np.int32)
    assert panoptic_quality(empty, empty)["pq"] == 1.0 and aggregated_jaccard(empty, empty) == 1.0
    assert panoptic_quality(empty, two_halves())["pq"] == 0.0 and aggregated_jaccard(empty, two_halves()) == 0.0
    assert aggregated_jaccard(two_halves(), empty) == 0.0
    scores = segmentation_scores((two_halves() > 0).astype(np.uint8) * 255, two_halves())
    assert scores["pq"] == 0.0 and scores["aji"] == pytest.approx(0.5)  # the binary mask is one component
