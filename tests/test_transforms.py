"""The Augmentation config and the albumentations pipeline built from it, on 2-D tiles and 3-D patches."""

import albumentations as A
import numpy as np
import pytest

from unetseg.training.augment import Augmentation, BrightnessContrast, Noise, build_transform

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
        ("brightness_contrast", [BrightnessContrast]),
        ("gamma", [A.RandomGamma]),
        ("noise", [Noise]),
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
        "BrightnessContrast",
        "RandomGamma",
        "Noise",
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


# Volumes: the same pipeline through albumentations' volume/mask3d targets -------------------------------------------

GEOMETRY = dict(flip=1, rotate90=1, scale=1, elastic=1, grid_distortion=1)
EVERY_PLANE_ALIKE = dict(
    GEOMETRY, brightness_contrast=1, gamma=1, blur=1, stain=1, hue_saturation=1, grey=0.5, invert=0.5
)


def random_patch(shape=(5, 24, 24), channels=3, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, Y, X, C) float32 patch in [0, 1] and (Z, Y, X) labels."""
    rng = np.random.default_rng(seed)
    return rng.random((*shape, channels)).astype(np.float32), rng.integers(0, 4, shape).astype(np.int32)


@pytest.mark.parametrize("settings", [GEOMETRY, EVERY_PLANE_ALIKE], ids=["geometry", "all-but-noise"])
def test_a_patch_gets_the_tile_transform_of_one_draw_on_every_plane(settings):
    """A volume through the pipeline equals each of its planes through it as a tile, with the same seed."""
    pipeline = build_transform(Augmentation(**{**OFF, **settings}))
    volume, labels = random_patch()
    for seed in range(6):
        pipeline.set_random_seed(seed)
        out = pipeline(volume=volume, mask3d=labels)
        assert out["volume"].shape == volume.shape and out["mask3d"].shape == labels.shape
        for z in range(len(volume)):
            pipeline.set_random_seed(seed)
            plane = pipeline(image=volume[z], mask=labels[z])
            np.testing.assert_allclose(out["volume"][z], plane["image"], atol=1e-6)
            np.testing.assert_array_equal(out["mask3d"][z], plane["mask"])


def test_flips_and_quarter_turns_of_a_patch_are_one_in_plane_symmetry_of_image_and_mask():
    pipeline = build_transform(Augmentation(**{**OFF, "flip": 0.5, "rotate90": 1}))
    volume, labels = random_patch(shape=(4, 12, 12), channels=2)
    symmetries = [
        lambda a, k=k, flip=flip: np.rot90(a[:, :, ::-1] if flip else a, k, axes=(1, 2))
        for k in range(4)
        for flip in (False, True)
    ]
    seen = set()
    for seed in range(24):
        pipeline.set_random_seed(seed)
        out = pipeline(volume=volume, mask3d=labels)
        matches = [
            i
            for i, symmetry in enumerate(symmetries)
            if np.array_equal(out["volume"], symmetry(volume)) and np.array_equal(out["mask3d"], symmetry(labels))
        ]
        assert matches, f"seed {seed}: not one in-plane flip/rotation of every plane, image and mask together"
        seen.add(matches[0])
    assert len(seen) >= 4  # the draws vary between calls


@pytest.mark.parametrize("name", ["scale", "elastic", "grid_distortion"])
def test_warps_never_resample_z_and_keep_the_plane_order(name):
    """Plane z holds label z + 1 and intensity z / 10 everywhere: an in-plane warp (mirrored borders) keeps both."""
    pipeline = build_transform(Augmentation(**{**OFF, name: 1}))
    depth = 6
    labels = np.broadcast_to(np.arange(1, depth + 1, dtype=np.int32)[:, None, None], (depth, 20, 20)).copy()
    volume = (labels[..., None] - 1).astype(np.float32) / 10
    for seed in range(4):
        pipeline.set_random_seed(seed)
        out = pipeline(volume=volume, mask3d=labels)
        assert out["volume"].shape == (depth, 20, 20, 1) and out["mask3d"].shape == (depth, 20, 20)
        np.testing.assert_array_equal(out["mask3d"], labels)
        np.testing.assert_allclose(out["volume"], volume, atol=1e-5)
    # The same warp moves a pattern, alike in every plane: the probe above is not blind.
    pattern = np.zeros((20, 20), np.int32)
    pattern[4:9, 5:15] = 1
    pipeline.set_random_seed(0)
    moved = pipeline(
        volume=np.repeat(pattern[None, ..., None], depth, 0).astype(np.float32),
        mask3d=np.repeat(pattern[None], depth, 0),
    )
    assert not np.array_equal(moved["mask3d"][0], pattern)
    assert all(np.array_equal(plane, moved["mask3d"][0]) for plane in moved["mask3d"])


def test_one_config_builds_one_pipeline_for_tiles_and_patches():
    config = Augmentation()
    pipeline = build_transform(config)
    pipeline.set_random_seed(0)
    tile = pipeline(image=np.full((16, 16, 1), 0.5, np.float32), masks=[np.ones((16, 16), np.int32)])
    assert tile["image"].shape == (16, 16, 1) and tile["masks"][0].shape == (16, 16)
    pipeline.set_random_seed(0)
    patch = pipeline(volume=np.full((4, 16, 16, 1), 0.5, np.float32), mask3d=np.ones((4, 16, 16), np.int32))
    assert patch["volume"].shape == (4, 16, 16, 1) and patch["mask3d"].shape == (4, 16, 16)
    assert patch["volume"].dtype == np.float32 and np.isfinite(patch["volume"]).all()


def test_intensity_transforms_act_on_a_whole_patch_with_one_setting_and_leave_its_mask_alone():
    pipeline = build_transform(Augmentation(**{**OFF, "brightness_contrast": 1, "gamma": 1}))
    volume = np.repeat(np.linspace(0.1, 0.9, 16 * 16, dtype=np.float32).reshape(1, 16, 16, 1), 3, axis=0)
    labels = np.random.default_rng(0).integers(0, 5, (3, 16, 16)).astype(np.int32)
    for seed in range(4):
        pipeline.set_random_seed(seed)
        out = pipeline(volume=volume, mask3d=labels)
        np.testing.assert_array_equal(out["mask3d"], labels)
        assert np.abs(out["volume"] - volume).mean() > 1e-3
        np.testing.assert_allclose(out["volume"][1:], out["volume"][:1].repeat(2, axis=0), atol=1e-6)


def test_noise_on_a_patch_is_drawn_per_voxel_with_the_configured_strength():
    pipeline = build_transform(Augmentation(**{**OFF, "noise": 1, "noise_std": (0.05, 0.05)}))
    pipeline.set_random_seed(0)
    volume = np.full((4, 32, 32, 2), 0.5, np.float32)
    out = pipeline(volume=volume)["volume"]
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[..., 0], out[..., 1])
    assert (out - volume).std() == pytest.approx(0.05, rel=0.1) and abs((out - volume).mean()) < 0.005
