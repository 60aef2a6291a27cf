"""The Augmentation config and the albumentations pipeline built from it."""

import albumentations as A
import numpy as np
import pytest

from unetseg.training.augment import Augmentation, build_transform

OFF = dict(flip=0, rotate90=0, elastic=0, grid_distortion=0, brightness_contrast=0, gamma=0, noise=0, blur=0)


def test_nothing_enabled_gives_no_pipeline():
    assert build_transform(None) is None
    assert build_transform(Augmentation(**OFF)) is None


@pytest.mark.parametrize(
    "name, types",
    [
        ("flip", [A.HorizontalFlip, A.VerticalFlip]),
        ("rotate90", [A.RandomRotate90]),
        ("scale", [A.Affine]),
        ("elastic", [A.ElasticTransform]),
        ("grid_distortion", [A.GridDistortion]),
        ("brightness_contrast", [A.RandomBrightnessContrast]),
        ("gamma", [A.RandomGamma]),
        ("noise", [A.GaussNoise]),
        ("blur", [A.GaussianBlur]),
    ],
)
def test_each_probability_enables_its_transform(name, types):
    pipeline = build_transform(Augmentation(**{**OFF, name: 0.25}))
    assert [type(step) for step in pipeline.transforms] == types
    assert all(step.p == 0.25 for step in pipeline.transforms)


def test_defaults_enable_flips_rotations_and_intensity_but_not_warps():
    names = {type(step).__name__ for step in build_transform(Augmentation()).transforms}
    assert {
        "HorizontalFlip",
        "VerticalFlip",
        "RandomRotate90",
        "RandomBrightnessContrast",
        "RandomGamma",
        "GaussNoise",
        "GaussianBlur",
    } == names


@pytest.mark.parametrize("name, value", [("flip", 1.5), ("noise", -0.1), ("elastic", 2)])
def test_probabilities_outside_unit_range_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"augmentation.{name} is a probability in \[0, 1\]"):
        Augmentation(**{name: value})


def test_intensity_transforms_leave_the_mask_alone():
    pipeline = build_transform(Augmentation(**{**OFF, "brightness_contrast": 1, "gamma": 1, "noise": 1, "blur": 1}))
    pipeline.set_random_seed(0)
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 1)).astype(np.float32)
    mask = rng.integers(0, 5, (32, 32)).astype(np.int32)
    out = pipeline(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask)
    assert out["image"].shape == (32, 32, 1) and out["image"].dtype == np.float32
    assert np.isfinite(out["image"]).all()
    assert np.abs(out["image"] - image).mean() > 1e-3


@pytest.mark.parametrize("channels", [1, 3])
def test_spatial_transforms_move_image_and_mask_together(channels):
    pipeline = build_transform(Augmentation(**{**OFF, "flip": 1, "rotate90": 1}))
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (16, 16)).astype(np.int32)
    image = np.repeat(mask[..., None].astype(np.float32), channels, axis=-1)
    for seed in range(8):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask)
        assert out["image"].shape == (16, 16, channels)
        for channel in range(channels):
            np.testing.assert_array_equal(out["image"][..., channel], out["mask"].astype(np.float32))


def test_zoom_changes_object_sizes_both_ways_and_keeps_labels_exact():
    pipeline = build_transform(Augmentation(**{**OFF, "scale": 1, "scale_limit": (0.5, 2.0)}))
    labels = np.zeros((96, 96), np.int32)
    labels[38:58, 38:58] = 7  # a 20 x 20 object at the centre, which every zoom keeps in view
    image = (labels > 0).astype(np.float32)[..., None]
    areas = []
    for seed in range(24):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=labels)
        assert out["image"].shape == (96, 96, 1) and out["mask"].shape == (96, 96)
        assert set(np.unique(out["mask"])) == {0, 7}  # nearest-neighbour: no blended label values
        areas.append(int((out["mask"] == 7).sum()))
    assert min(areas) < 400 * 0.8 and max(areas) > 400 * 1.25  # zoomed out and in
    assert min(areas) > 400 * 0.5**2 * 0.8 and max(areas) < 400 * 2.0**2 * 1.2  # within scale_limit


@pytest.mark.parametrize("limit", [(1.2, 1.5), (0.5, 0.9), (0, 1.5)])
def test_zoom_ranges_that_do_not_bracket_one_are_refused(limit):
    with pytest.raises(ValueError, match="augmentation.scale_limit must be"):
        Augmentation(scale_limit=limit)
