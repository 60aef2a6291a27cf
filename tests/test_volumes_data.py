"""3-D training data: volume pairs, random patches with foreground oversampling, validation grids, patches
through the one augmentation pipeline, and the data module with spatial_dims 3."""

import albumentations as A
import numpy as np
import pytest
import tifffile
import torch

from unetseg.io import ImageReadError, Normalization
from unetseg.synthetic import make_nuclei_volumes
from unetseg.training.augment import Augmentation, build_transform
from unetseg.training.data import SegmentationDataModule
from unetseg.training.samples import Sample, foreground_coordinates, pad_sample, window_grid
from unetseg.training.volumes import PatchDataset, load_volume_sample, volume_datasets

pytest.importorskip("nibabel")
NO_AUGMENTATION = Augmentation(flip=0, rotate90=0, brightness_contrast=0, gamma=0, noise=0, blur=0)


def sample(shape=(6, 20, 24), name="v") -> Sample:
    labels = np.zeros(shape, np.int32)
    labels[2:4, 5:9, 6:12] = 1
    image = (labels * 1000 + 100).astype(np.uint16)[None]
    return Sample(name, image, labels, (100.0, 1100.0), foreground_coordinates(labels))


def volume_data(tmp_path, **options) -> SegmentationDataModule:
    """A 3-D data module of 8 x 16 x 16 patches (batch 2, 4 an epoch) over 3 synthetic nuclei volumes."""
    root = make_nuclei_volumes(tmp_path / "v", count=3, shape=(8, 32, 32))
    settings = dict(spatial_dims=3, patch_size=[8, 16, 16], batch_size=2, tiles_per_epoch=4, num_workers=0)
    return SegmentationDataModule(root=str(root), **settings, **options)


def test_window_grid_covers_the_volume_with_shifted_last_patches():
    corners = window_grid((6, 20, 24), (4, 8, 8))
    assert corners[0] == (0, 0, 0) and corners[-1] == (2, 12, 16)
    covered = np.zeros((6, 20, 24), bool)
    for z, y, x in corners:
        covered[z : z + 4, y : y + 8, x : x + 8] = True
    assert covered.all()
    assert window_grid((3, 5, 5), (4, 8, 8)) == [(0, 0, 0)]  # smaller than a patch: one smaller patch


def test_random_patches_have_the_patch_size_and_oversample_foreground():
    dataset = PatchDataset([sample()], Normalization(), (4, 8, 8), "foreground", length=64, foreground_oversampling=1.0)
    torch.manual_seed(0)
    items = [dataset[i] for i in range(16)]
    assert all(item["image"].shape == (1, 4, 8, 8) and item["target"].shape == (4, 8, 8) for item in items)
    assert all(item["target"].sum() > 0 for item in items)  # centred on a foreground voxel
    # The image follows the labels through normalisation: foreground 1, background 0.
    for item in items:
        np.testing.assert_array_equal(item["image"][0].numpy() > 0.5, item["target"].numpy() == 1)


def test_validation_patches_are_fixed_and_cover_each_volume():
    dataset = PatchDataset([sample(), sample(name="w")], Normalization(), (4, 8, 8), "boundary")
    assert len(dataset) == 2 * len(window_grid((6, 20, 24), (4, 8, 8)))
    first, again = dataset[0], dataset[0]
    assert torch.equal(first["image"], again["image"]) and first["target"].shape == (4, 8, 8)


def test_augmentation_moves_every_plane_alike_and_keeps_labels_with_the_image():
    volume = sample(shape=(6, 16, 16))
    transform = build_transform(
        Augmentation(flip=1.0, rotate90=1.0, elastic=1.0, brightness_contrast=0, gamma=0, noise=0, blur=0)
    )
    dataset = PatchDataset([volume], Normalization(), (6, 16, 16), "foreground", length=6, transform=transform)
    changed = False
    for seed in range(6):
        torch.manual_seed(seed)
        item = dataset[0]
        out_image, out_labels = item["image"].numpy(), item["target"].numpy()
        assert out_image.shape == (1, 6, 16, 16) and out_labels.shape == (6, 16, 16)
        assert set(np.unique(out_labels)) <= {0, 1}
        # Planes without foreground stay empty: nothing moves along Z.
        np.testing.assert_array_equal(out_labels.reshape(6, -1).any(1), volume.labels.reshape(6, -1).any(1))
        inside = out_image[0][out_labels == 1]
        assert inside.mean() > 0.8  # the labels still sit on the bright voxels
        changed |= not np.array_equal(out_labels, volume.labels)
    assert changed


def test_augmented_patches_are_reproducible_with_the_torch_seed():
    transform = build_transform(Augmentation(elastic=1.0, noise=1.0))
    dataset = PatchDataset([sample()], Normalization(), (4, 8, 8), "boundary", length=8, transform=transform)
    torch.manual_seed(3)
    first = [dataset[i] for i in range(3)]
    torch.manual_seed(3)
    again = [dataset[i] for i in range(3)]
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(first[0]["image"], first[1]["image"])


def test_noise_is_drawn_per_voxel_not_repeated_in_every_plane():
    transform = build_transform(Augmentation(flip=0, rotate90=0, brightness_contrast=0, gamma=0, noise=1.0, blur=0))
    image = np.zeros((1, 4, 16, 16), np.float32)
    transform.set_random_seed(0)
    out = np.moveaxis(
        transform(volume=np.moveaxis(image, 0, -1), mask3d=np.zeros((4, 16, 16), np.int32))["volume"], -1, 0
    )
    assert out.shape == image.shape and out.std() > 0 and not np.allclose(out[0, 0], out[0, 1])


def test_training_patches_get_the_pipeline_of_tiles_from_the_same_config(tmp_path):
    config = Augmentation(elastic=0.5, stain=0.2)
    steps = [type(step) for step in build_transform(config).transforms]
    data = volume_data(tmp_path, augmentation=config)
    data.setup("fit")
    assert isinstance(data.train_set.transform, A.Compose)
    assert [type(step) for step in data.train_set.transform.transforms] == steps
    assert data.val_set.transform is None


def test_quarter_turns_of_patches_not_square_in_plane_are_refused():
    samples, split = {"v": sample()}, {"train": ["v"], "val": ["v"]}
    common = dict(normalization=Normalization(), targets="foreground", length=4, foreground_oversampling=0.33)
    with pytest.raises(ValueError, match=r"augmentation.rotate90 swaps Y and X.*got \[4, 8, 12\]"):
        volume_datasets(samples, split, (4, 8, 12), augmentation=Augmentation(rotate90=0.5), **common)
    train, _ = volume_datasets(samples, split, (4, 8, 12), augmentation=Augmentation(rotate90=0), **common)
    torch.manual_seed(0)
    assert all(train[i]["image"].shape == (1, 4, 8, 12) for i in range(4))


def test_volume_pairs_load_with_their_spacing_and_range(tmp_path):
    root = make_nuclei_volumes(tmp_path / "v", count=2, shape=(8, 32, 32))
    for name in ("volume_000.tif", "volume_001.nii.gz"):
        loaded = load_volume_sample(root / "images" / name, root / "masks" / name, 1, Normalization())
        assert loaded.image.shape == (1, 8, 32, 32) and loaded.labels.shape == (8, 32, 32)
        assert loaded.spacing == pytest.approx((2.0, 0.5, 0.5))
        assert loaded.value_range == tuple(float(v) for v in np.percentile(loaded.image, [1.0, 99.8], method="lower"))


def test_mismatched_volume_mask_is_named(tmp_path):
    stack = {"imagej": True, "metadata": {"axes": "ZYX"}}
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 8, 8), np.uint16), **stack)
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((5, 8, 8), np.uint16), **stack)
    with pytest.raises(ImageReadError, match=r"m.tif: mask is 5x8x8 \(Z, Y, X\) but its image a.tif is 4x8x8"):
        load_volume_sample(tmp_path / "a.tif", tmp_path / "m.tif", 1, Normalization())


def test_data_module_in_3d_gives_volume_patches(tmp_path):
    data = volume_data(tmp_path, targets="boundary", augmentation=NO_AUGMENTATION)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 8, 16, 16) and batch["target"].shape == (2, 8, 16, 16)
    assert set(batch["target"].unique().tolist()) <= {0, 1, 2}
    assert len(data.val_set) == len(data.split["val"]) * 4


def test_data_module_refuses_2d_only_options_and_stacks_in_2d(tmp_path):
    with pytest.raises(ValueError, match="border_weights is 2-D only"):
        SegmentationDataModule(spatial_dims=3, border_weights=True)
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        SegmentationDataModule(spatial_dims=4)
    root = make_nuclei_volumes(tmp_path / "v", count=2, shape=(8, 32, 32))
    with pytest.raises(ValueError, match="set data.spatial_dims: 3"):
        SegmentationDataModule(root=str(root), num_workers=0).setup("fit")


def test_pad_sample_pads_every_axis_shorter_than_a_window_and_keeps_what_it_knew():
    """One pad for images and volumes: the 2-D pad dropped stored_channels before the merge."""
    small = Sample(
        "v",
        np.ones((1, 3, 5, 40), np.uint16),
        np.ones((3, 5, 40), np.int32),
        (0.0, 1.0),
        foreground_coordinates(np.ones((3, 5, 40))),
        stored_channels=3,
        spacing=(2.0, 0.5, 0.5),
    )
    padded = pad_sample(small, (4, 8, 8))
    assert padded.labels.shape == (4, 8, 40) and padded.image.shape == (1, 4, 8, 40)
    assert padded.stored_channels == 3 and padded.spacing == (2.0, 0.5, 0.5)
    assert padded.foreground.shape[1] == 3 and len(padded.foreground) == min(4096, 4 * 8 * 40)
    image = pad_sample(Sample("i", np.ones((3, 10, 20)), np.ones((10, 20), np.int32), (0.0, 1.0), np.zeros((0, 2))), 16)
    assert image.labels.shape == (16, 20) and image.image.shape == (3, 16, 20)
