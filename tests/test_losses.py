"""The U-Net border weight map and the cross-entropy + Dice loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unetseg.training.losses import SegmentationLoss
from unetseg.training.targets import border_weight_map, weight_radius


def two_squares_with_gap(gap: int = 2) -> np.ndarray:
    """Two 10x10 squares side by side, `gap` background columns apart, in a 60x80 image."""
    labels = np.zeros((60, 80), np.int32)
    labels[20:30, 10:20] = 1
    labels[20:30, 20 + gap : 30 + gap] = 2
    return labels


def test_gap_weight_matches_the_formula():
    labels = two_squares_with_gap(2)
    weights = border_weight_map(labels, w0=10.0, sigma=5.0)
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    # Gap pixels (columns 20 and 21) are 1 px from one square and 2 px from the other.
    expected = 1 + 10 * math.exp(-((1 + 2) ** 2) / (2 * 5.0**2))
    np.testing.assert_allclose(weights[20:30, 20:22], expected, rtol=1e-5)
    assert weights.max() == pytest.approx(expected, rel=1e-5)


def test_weights_are_one_inside_objects_and_near_one_far_away():
    labels = two_squares_with_gap(2)
    weights = border_weight_map(labels)
    np.testing.assert_array_equal(weights[labels > 0], 1.0)
    assert weights[59, 79] == pytest.approx(1.0, abs=1e-6)  # ~55 px from both squares
    assert weights[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert (weights >= 1.0).all()


def test_gap_weight_falls_with_distance():
    narrow = border_weight_map(two_squares_with_gap(2))[25, 20]
    wide = border_weight_map(two_squares_with_gap(6))[25, 23]  # middle of a 6-px gap: d1 = 3, d2 = 4
    assert wide == pytest.approx(1 + 10 * math.exp(-49 / 50), rel=1e-5)
    assert narrow > wide


def test_fewer_than_two_objects_give_all_ones():
    labels = np.zeros((20, 20), np.int32)
    np.testing.assert_array_equal(border_weight_map(labels), 1.0)
    labels[5:10, 5:10] = 255
    np.testing.assert_array_equal(border_weight_map(labels), 1.0)


def test_w0_and_sigma_scale_the_weights():
    labels = two_squares_with_gap(2)
    weights = border_weight_map(labels, w0=4.0, sigma=2.0)
    assert weights[25, 20] == pytest.approx(1 + 4 * math.exp(-9 / 8), rel=1e-5)


def random_batch(classes, seed=0, shape=(2, 16, 16)):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, max(classes, 2), shape, generator=generator)
    logits = torch.randn(shape[0], classes, *shape[1:], generator=generator)
    return logits, target


def perfect_logits(target, classes):
    if classes == 1:
        return (target.float() * 2 - 1)[:, None] * 20
    return F.one_hot(target, classes).permute(0, 3, 1, 2).float() * 40 - 20


@pytest.mark.parametrize("classes", [1, 3])
def test_loss_is_finite_and_perfect_logits_score_lower(classes):
    loss = SegmentationLoss(classes)
    logits, target = random_batch(classes)
    random_loss = loss(logits, target)
    assert random_loss.ndim == 0 and torch.isfinite(random_loss)
    perfect = loss(perfect_logits(target, classes), target)
    assert perfect < 0.05 < random_loss
    assert perfect >= 0


@pytest.mark.parametrize("classes", [1, 3])
def test_weight_map_changes_the_loss(classes):
    loss = SegmentationLoss(classes)
    logits, target = random_batch(classes)
    weight = torch.ones(target.shape)
    torch.testing.assert_close(loss(logits, target, weight), loss(logits, target))
    weight[:, :4] = 10.0
    assert loss(logits, target, weight) > loss(logits, target) + 0.1


def test_without_dice_the_loss_is_weighted_binary_cross_entropy():
    loss = SegmentationLoss(1, dice_weight=0.0)
    logits, target = random_batch(1)
    weight = torch.rand(target.shape) * 3
    expected = (F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none") * weight).mean()
    torch.testing.assert_close(loss(logits, target, weight), expected)


def test_without_dice_the_multiclass_loss_is_cross_entropy():
    loss = SegmentationLoss(3, dice_weight=0.0)
    logits, target = random_batch(3)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))


def test_dice_weight_adds_the_dice_term():
    logits, target = random_batch(1)
    plain = SegmentationLoss(1, dice_weight=0.0)(logits, target)
    once = SegmentationLoss(1, dice_weight=1.0)(logits, target)
    twice = SegmentationLoss(1, dice_weight=2.0)(logits, target)
    torch.testing.assert_close(twice - plain, 2 * (once - plain))
    assert once > plain


def test_loss_has_gradients():
    logits, target = random_batch(3)
    logits.requires_grad_(True)
    SegmentationLoss(3)(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def unbounded_weight_map(labels, w0=10.0, sigma=5.0):
    """The formula with one distance transform of the whole image per instance: the reference."""
    ids = [label for label in np.unique(labels) if label > 0]
    distances = np.sort(np.stack([ndimage.distance_transform_edt(labels != label) for label in ids]), axis=0)
    weights = 1 + w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    return np.where(labels == 0, weights, 1.0)


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (4.0, 2.0), (30.0, 8.0)])
def test_weights_bounded_to_instance_boxes_equal_the_whole_image_formula(w0, sigma):
    rng = np.random.default_rng(int(w0))
    labels = np.zeros((150, 170), np.int32)
    for label in range(1, 30):  # scattered rectangles, some touching, some far apart
        y, x, h, w = rng.integers(0, 140), rng.integers(0, 160), rng.integers(2, 12), rng.integers(2, 12)
        labels[y : y + h, x : x + w] = label
    assert weight_radius(w0, sigma) < 75  # the bound really cuts the work here
    np.testing.assert_allclose(
        border_weight_map(labels, w0, sigma), unbounded_weight_map(labels, w0, sigma), rtol=1e-6, atol=2e-6
    )
