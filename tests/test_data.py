"""Pairing files, loading samples, tiles and targets, augmentation alignment and the data module."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import tifffile
import torch
from conftest import write_pair
from lightning.pytorch.loggers import CSVLogger
from skimage import io as skio

from unetseg.io import ImageReadError, Normalization, find_pairs
from unetseg.training.augment import Augmentation, build_transform
from unetseg.training.data import SegmentationDataModule, TileDataset, load_sample, make_target, tile_grid
from unetseg.training.targets import border_weight_map, weight_radius

SPATIAL_ONLY = Augmentation(
    flip=1.0, rotate90=1.0, elastic=1.0, grid_distortion=1.0, brightness_contrast=0.0, gamma=0.0, noise=0.0, blur=0.0
)
NO_AUGMENTATION = Augmentation(
    flip=0, rotate90=0, elastic=0, grid_distortion=0, brightness_contrast=0, gamma=0, noise=0, blur=0
)


def blobs(shape=(64, 64), count=6, seed=0, radii=(4, 10)) -> np.ndarray:
    """Instance labels: `count` discs with radii in `radii` at random places (uint16)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for label in range(1, count + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        radius = rng.uniform(*radii)
        labels[((rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2) & (labels == 0)] = label
    return labels


def module(root, **kwargs) -> SegmentationDataModule:
    defaults = dict(root=str(root), tile_size=32, batch_size=2, tiles_per_epoch=4, num_workers=0)
    return SegmentationDataModule(**{**defaults, **kwargs})


# find_pairs -----------------------------------------------------------------------------------------------------------


def touch_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_find_pairs_matches_stems_across_suffixes_and_subfolders(tmp_path):
    touch_images(
        tmp_path,
        [
            "images/a.png",
            "masks/a.tif",
            "images/sub/b.tif",
            "masks/sub/b.png",
            "images/c.tiff",
            "masks/c.TIF",
            "images/notes.txt",
            "masks/.hidden.png",
        ],
    )
    pairs = find_pairs(tmp_path)
    assert pairs == [
        (tmp_path / "images/a.png", tmp_path / "masks/a.tif"),
        (tmp_path / "images/c.tiff", tmp_path / "masks/c.TIF"),
        (tmp_path / "images/sub/b.tif", tmp_path / "masks/sub/b.png"),
    ]


def test_find_pairs_custom_folder_names(tmp_path):
    touch_images(tmp_path, ["raw/a.png", "labels/a.png"])
    assert find_pairs(tmp_path, images="raw", masks="labels") == [(tmp_path / "raw/a.png", tmp_path / "labels/a.png")]


def test_unpaired_files_are_all_named(tmp_path):
    touch_images(tmp_path, ["images/a.png", "masks/a.png", "images/lonely.png", "masks/orphan.tif", "masks/sub/a.png"])
    with pytest.raises(ValueError) as error:
        find_pairs(tmp_path)
    message = str(error.value)
    assert f"{tmp_path / 'images/lonely.png'}: no mask" in message
    assert f"{tmp_path / 'masks/orphan.tif'}: no image" in message
    assert f"{tmp_path / 'masks/sub/a.png'}: no image" in message  # sub-folders must match too
    assert "images/a.png" not in message


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        find_pairs(tmp_path)


@pytest.mark.parametrize("missing", ["images", "masks"])
def test_missing_folder_is_named(tmp_path, missing):
    for folder in {"images", "masks"} - {missing}:
        (tmp_path / folder).mkdir()
    with pytest.raises(ValueError) as error:
        find_pairs(tmp_path)
    assert f"{tmp_path / missing}: folder not found" in str(error.value)


def test_two_files_with_one_stem_are_refused(tmp_path):
    touch_images(tmp_path, ["images/a.png", "images/a.tif", "masks/a.png"])
    with pytest.raises(ValueError) as error:
        find_pairs(tmp_path)
    assert "a.png" in str(error.value) and "a.tif" in str(error.value) and "two files with one name" in str(error.value)


# load_sample ----------------------------------------------------------------------------------------------------------


def test_load_sample_converts_channels_and_takes_the_whole_image_range(tmp_path):
    image = np.random.default_rng(0).integers(0, 4096, (40, 30)).astype(np.uint16)
    write_pair(tmp_path, "a", image, blobs((40, 30)))
    sample = load_sample(tmp_path / "images/a.tif", tmp_path / "masks/a.tif", 3, Normalization())
    assert sample.name == "a"
    assert sample.image.shape == (3, 40, 30) and sample.image.dtype == np.uint16
    assert sample.labels.shape == (40, 30)
    # The range is taken once over the whole converted image (all channels together).
    assert sample.value_range == Normalization().range(np.stack([image] * 3))
    assert len(sample.foreground) == (sample.labels > 0).sum()
    assert (sample.labels[tuple(sample.foreground.T)] > 0).all()


def test_mask_of_another_size_names_both_files(tmp_path):
    write_pair(tmp_path, "a", np.zeros((40, 30), np.uint8), np.zeros((40, 31), np.uint8))
    with pytest.raises(ImageReadError) as error:
        load_sample(tmp_path / "images/a.tif", tmp_path / "masks/a.tif", 1, Normalization())
    message = str(error.value)
    assert str(tmp_path / "masks/a.tif") in message and "a.tif is 40x30" in message and "40x31" in message


# Targets --------------------------------------------------------------------------------------------------------------


def touching_squares() -> np.ndarray:
    labels = np.zeros((10, 12), np.int32)
    labels[2:7, 1:5] = 1
    labels[2:7, 5:9] = 2  # touches label 1 along column 4 | 5
    return labels


def test_foreground_target():
    target = make_target(touching_squares() * 255, "foreground")
    assert target.dtype == np.int64
    np.testing.assert_array_equal(target, touching_squares() > 0)


def test_boundary_target_separates_touching_objects():
    labels = touching_squares()
    target = make_target(labels, "boundary")
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[labels == 0] == 0).all()
    assert (target[2, 1:9] == 2).all() and (target[6, 1:9] == 2).all()  # top and bottom edges
    assert (target[3:6, 4] == 2).all() and (target[3:6, 5] == 2).all()  # where the two touch
    np.testing.assert_array_equal(target[3:6, 2:4], 1)  # interiors
    np.testing.assert_array_equal(target[3:6, 6:8], 1)


def test_classes_target_is_the_mask():
    labels = touching_squares()
    np.testing.assert_array_equal(make_target(labels, "classes"), labels)


# TileDataset and augmentation -----------------------------------------------------------------------------------------


def pattern_dataset(
    tmp_path, targets="foreground", transform=None, length=24, shape=(96, 96), tile_size=96, border_weights=False
):
    """Images whose intensity is their label pattern: 20 background, 200 on objects -> exactly 0 / 1."""
    labels = blobs(shape, count=6, radii=(8, 16))
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    write_pair(tmp_path, "p", image, labels)
    sample = load_sample(tmp_path / "images/p.tif", tmp_path / "masks/p.tif", 1, Normalization(low=0, high=100))
    dataset = TileDataset(
        [sample],
        Normalization(low=0, high=100),
        tile_size=tile_size,
        targets=targets,
        length=length,
        transform=transform,
        foreground_oversampling=0.0,
        border_weights=border_weights,
    )
    return dataset, labels


def test_spatial_augmentation_keeps_masks_aligned(tmp_path):
    torch.manual_seed(0)
    dataset, labels = pattern_dataset(tmp_path, transform=build_transform(SPATIAL_ONLY))
    moved = 0
    for index in range(len(dataset)):
        item = dataset[index]
        image, target = item["image"].numpy(), item["target"].numpy()
        assert image.shape == (1, 96, 96) and image.dtype == np.float32
        assert target.shape == (96, 96) and target.dtype == np.int64
        foreground = image[0] > 0.5
        agreement = (target == foreground).mean()
        # Interpolation (bilinear image, nearest mask) only differs on object edges.
        assert agreement >= 0.99, f"tile {index}: image and mask agree on only {agreement:.3f}"
        shifted = (np.roll(target, 2, axis=0) == foreground).mean()
        assert shifted < agreement - 0.01  # the check is sensitive to a 2-pixel misalignment
        moved += (target == (labels > 0)).mean() < 0.95
    assert moved >= len(dataset) // 2  # the augmentations really moved the tiles


def test_elastic_and_grid_keep_instance_labels_as_labels(tmp_path):
    torch.manual_seed(0)
    dataset, labels = pattern_dataset(tmp_path, targets="classes", transform=build_transform(SPATIAL_ONLY), length=8)
    for index in range(len(dataset)):
        values = set(np.unique(dataset[index]["target"].numpy()))
        assert values <= set(np.unique(labels)), "interpolated mask values"


def test_random_tiles_are_reproducible_with_the_torch_seed(tmp_path):
    dataset, _ = pattern_dataset(tmp_path, transform=build_transform(Augmentation()), shape=(80, 90), tile_size=32)
    torch.manual_seed(3)
    first = [dataset[i]["image"] for i in range(4)]
    torch.manual_seed(3)
    second = [dataset[i]["image"] for i in range(4)]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], first[1])


def test_foreground_oversampling_centres_tiles_on_objects(tmp_path):
    labels = np.zeros((200, 200), np.uint16)
    labels[150:156, 20:26] = 1  # one small object in a large empty image
    write_pair(tmp_path, "a", np.where(labels > 0, 200, 20).astype(np.uint8), labels)
    sample = load_sample(tmp_path / "images/a.tif", tmp_path / "masks/a.tif", 1, Normalization())
    torch.manual_seed(0)
    always = TileDataset([sample], Normalization(), 16, "foreground", length=20, foreground_oversampling=1.0)
    assert all(always[i]["target"].sum() > 0 for i in range(len(always)))
    never = TileDataset([sample], Normalization(), 16, "foreground", length=20, foreground_oversampling=0.0)
    assert sum(never[i]["target"].sum() > 0 for i in range(len(never))) < 10


def test_validation_grid_covers_every_pixel_and_is_deterministic(tmp_path):
    labels = blobs((70, 50))
    write_pair(tmp_path, "a", (labels * 10).astype(np.uint8), labels)
    sample = load_sample(tmp_path / "images/a.tif", tmp_path / "masks/a.tif", 1, Normalization())
    assert tile_grid(sample, 32) == [(0, 0), (0, 18), (32, 0), (32, 18), (38, 0), (38, 18)]
    dataset = TileDataset([sample], Normalization(), 32, "classes")
    assert len(dataset) == 6
    covered = np.zeros((70, 50), bool)
    whole = Normalization()(sample.image)
    for index, (_, y, x) in enumerate(dataset.grid):
        item = dataset[index]
        np.testing.assert_array_equal(item["target"].numpy(), labels[y : y + 32, x : x + 32])
        np.testing.assert_allclose(item["image"].numpy(), whole[:, y : y + 32, x : x + 32], atol=1e-6)
        torch.testing.assert_close(item["image"], dataset[index]["image"])
        covered[y : y + 32, x : x + 32] = True
    assert covered.all()


def test_border_weights_are_added_when_enabled(tmp_path):
    dataset, _ = pattern_dataset(tmp_path, length=2)
    assert "weight" not in dataset[0]
    dataset, _ = pattern_dataset(tmp_path, length=2, border_weights=True)
    weight = dataset[0]["weight"]
    assert weight.shape == (96, 96) and weight.dtype == torch.float32
    assert weight.min() == 1.0 and weight.max() > 1.5


def test_precomputed_targets_and_weights_equal_per_tile_ones_after_cropping(tmp_path):
    labels = blobs((170, 150), count=30, radii=(4, 9))
    write_pair(tmp_path, "a", np.where(labels > 0, 200, 20).astype(np.uint8), labels)
    sample = load_sample(tmp_path / "images/a.tif", tmp_path / "masks/a.tif", 1, Normalization())
    size = 100
    dataset = TileDataset([sample], Normalization(), size, "boundary", border_weights=True)
    margin = weight_radius(10.0, 5.0)  # instances farther than this from a pixel do not change its weight
    inside = np.zeros((size, size), bool)
    inside[margin:-margin, margin:-margin] = True
    assert inside.sum() > 30**2 and dataset.maps[0][0].dtype == np.uint8  # targets kept compact per image
    whole_image, compared = border_weight_map(labels), []
    for index, (_, y, x) in enumerate(dataset.grid):
        item, tile = dataset[index], labels[y : y + size, x : x + size]
        target, weight, alone = item["target"].numpy(), item["weight"].numpy(), border_weight_map(tile)
        np.testing.assert_array_equal(target[1:-1, 1:-1], make_target(tile, "boundary")[1:-1, 1:-1])
        compared.append(alone[inside].max())
        np.testing.assert_allclose(weight[inside], alone[inside], rtol=0, atol=1e-5)
        np.testing.assert_allclose(weight, whole_image[y : y + size, x : x + size], rtol=0, atol=1e-6)
    assert len(compared) == 4 and max(compared) > 1.01  # gaps between nuclei lie in the compared part


def test_spatial_augmentation_moves_weight_maps_with_targets(tmp_path):
    torch.manual_seed(0)
    dataset, _ = pattern_dataset(tmp_path, transform=build_transform(SPATIAL_ONLY), length=6, border_weights=True)
    for index in range(len(dataset)):
        item = dataset[index]
        weight, target = item["weight"].numpy(), item["target"].numpy()
        assert weight.dtype == np.float32 and weight.shape == target.shape
        assert np.all(weight[target > 0] == 1.0)  # the extra weight lies on background only, wherever it moved


# SegmentationDataModule -----------------------------------------------------------------------------------------------


def test_setup_builds_train_and_val_tiles(shared_dataset):
    data = module(shared_dataset, tile_size=32, batch_size=2, tiles_per_epoch=6, augmentation=NO_AUGMENTATION)
    data.setup("fit")
    assert len(data.split["train"]) == 5 and len(data.split["val"]) == 1
    assert len(data.train_set) == 6
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (2, 32, 32) and batch["target"].dtype == torch.int64
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["target"].unique().tolist()) <= {0, 1}
    assert len(data.val_set) == 9  # a 96x96 image in 32-px tiles
    spec = data.input_spec.to_dict()
    intensity = spec.pop("intensity")
    assert spec == {
        "in_channels": 1,
        "normalization": {"low": 1.0, "high": 99.8, "clip": True},
        "targets": "foreground",
        "classes": 1,
    }
    # The training images' intensities, for out-of-domain warnings: 8-bit PNGs and 12-bit TIFFs alike.
    assert intensity["images"] == 5
    assert intensity["high"][0] <= 255 < intensity["high"][1] <= 4095
    assert 0.0 <= intensity["median"][0] <= intensity["median"][1] < 0.5  # dark background, bright nuclei
    assert data.stored_channels == {1: 6}


def test_val_tile_size_sets_validation_tiles(shared_dataset):
    data = module(shared_dataset, tile_size=32, val_tile_size=64)
    data.setup("fit")
    assert len(data.val_set) == 4  # 96 in 64-px tiles: two rows, two columns
    assert data.val_set[0]["image"].shape == (1, 64, 64)
    assert data.train_set[0]["image"].shape == (1, 32, 32)


def test_three_channel_input_from_grey_files(shared_dataset):
    data = module(shared_dataset, in_channels=3)
    data.setup("fit")
    image = data.val_set[0]["image"]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], image[2])


def test_images_smaller_than_a_tile_are_padded_for_training(tmp_path):
    shapes = [(20, 27), (1, 27), (5, 3)]
    for index, shape in enumerate(shapes):
        labels = np.zeros(shape, np.uint8)
        labels[:, : shape[1] // 2] = 1
        write_pair(tmp_path, f"small{index}", np.where(labels > 0, 200, 20).astype(np.uint8), labels)
    data = module(tmp_path, tile_size=48, tiles_per_epoch=8, val_fraction=0.34)
    data.setup("fit")
    assert len(data.train_set.samples) == 2
    for index in range(8):
        item = data.train_set[index]
        assert item["image"].shape == (1, 48, 48) and item["target"].shape == (48, 48)
    (val_name,) = data.split["val"]
    (val_item,) = data.val_set  # validation never scores padding: one tile of the image's own size
    assert val_item["image"].shape == (1, *shapes[int(val_name[-1])])


def test_split_is_deterministic_by_seed(shared_dataset):
    def split(seed):
        data = module(shared_dataset, val_fraction=0.5, seed=seed)
        data.setup("fit")
        return data.split

    first = split(0)
    assert first == split(0)
    assert len(first["train"]) == 3 and len(first["val"]) == 3
    assert not set(first["train"]) & set(first["val"])
    assert set(first["train"]) | set(first["val"]) == {f"nuclei_{i:03d}" for i in range(6)}
    assert any(split(seed) != first for seed in (1, 2, 3))


def test_split_json_is_written_to_the_trainer_log_dir(shared_dataset, tmp_path):
    trainer = pl.Trainer(
        logger=CSVLogger(tmp_path / "run", name="", version=""),
        default_root_dir=tmp_path / "run",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = module(shared_dataset)
    data.trainer = trainer
    data.setup("fit")
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == data.split


def test_split_file_is_honoured(shared_dataset, tmp_path):
    split_file = tmp_path / "split.json"
    split = {"train": ["nuclei_000", "nuclei_003"], "val": ["nuclei_005"]}
    split_file.write_text(json.dumps(split))
    data = module(shared_dataset, split_file=str(split_file))
    data.setup("fit")
    assert data.split == split
    assert [sample.name for sample in data.train_set.samples] == ["nuclei_000", "nuclei_003"]
    assert [sample.name for sample in data.val_set.samples] == ["nuclei_005"]


@pytest.mark.parametrize(
    "split", [{"train": ["nuclei_000", "nope"], "val": ["nuclei_001"]}, {"train": ["nuclei_000"], "val": []}]
)
def test_bad_split_file_is_refused(shared_dataset, tmp_path, split):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    with pytest.raises(ValueError) as error:
        module(shared_dataset, split_file=str(split_file)).setup("fit")
    assert str(split_file) in str(error.value)


def test_unreadable_image_is_reported_before_training(make_dataset):
    root = make_dataset(count=4)
    broken = root / "images" / "nuclei_002.png"
    broken.write_text("not a png")
    with pytest.raises(ValueError) as error:
        module(root).setup("fit")
    message = str(error.value)
    assert "1 of 4 training pairs cannot be used" in message and str(broken) in message


def test_mask_value_beyond_classes_names_the_file(tmp_path):
    for name, top in (("a", 1), ("b", 2), ("c", 1)):
        labels = np.zeros((32, 32), np.uint8)
        labels[4:10, 4:10] = top
        write_pair(tmp_path, name, labels * 50, labels)
    with pytest.raises(ValueError) as error:
        module(tmp_path, targets="classes", classes=2).setup("fit")
    message = str(error.value)
    assert f"{tmp_path / 'masks/b.tif'}: holds class 2 but classes=2" in message
    assert "masks/a.tif" not in message
    module(tmp_path, targets="classes", classes=3).setup("fit")  # within range: accepted


def test_targets_and_border_weights_through_the_module(shared_dataset):
    data = module(shared_dataset, targets="boundary", border_weights=True, val_tile_size=96)
    data.setup("fit")
    assert data.output_classes == 3
    (item,) = data.val_set  # the whole 96x96 validation image
    assert set(item["target"].unique().tolist()) == {0, 1, 2}
    assert item["weight"].shape == item["target"].shape == (96, 96)
    assert item["weight"].max() > 1.0
    assert "weight" in data.train_set[0]


def test_too_few_pairs(tmp_path):
    write_pair(tmp_path, "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="found 1 image/mask pair; need at least 2"):
        module(tmp_path).setup("fit")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(targets="edges"), ["targets='edges'", "'foreground'", "'boundary'", "'classes'"]),
        (dict(targets="classes"), ["classes >= 2"]),
        (dict(targets="classes", classes=1), ["classes >= 2"]),
        (dict(val_fraction=0.0), ["val_fraction", "(0, 1)"]),
        (dict(val_fraction=1.0), ["val_fraction"]),
        (dict(in_channels=2), ["in_channels", "1 (grey) or 3 (RGB)"]),
    ],
)
def test_bad_data_module_arguments(kwargs, words):
    with pytest.raises(ValueError) as error:
        SegmentationDataModule(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_same_stem_in_two_subfolders_stays_two_samples(tmp_path):
    for index, sub in enumerate(["one", "two", "three"]):
        labels = blobs((40, 40), seed=index)
        write_pair(tmp_path, f"{sub}/cell", np.where(labels > 0, 200, 20).astype(np.uint8), labels)
    data = module(tmp_path, val_fraction=0.34)
    data.setup("fit")
    train, val = data.split["train"], data.split["val"]
    assert len(set(train)) == 2 and len(set(val)) == 1
    assert not set(train) & set(val)
    images = [sample.image.tobytes() for sample in data.train_set.samples + data.val_set.samples]
    assert len(set(images)) == 3


def test_png_and_tiff_pairs_load_together(tmp_path):
    labels = blobs((30, 30))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    skio.imsave(tmp_path / "images/a.png", np.where(labels > 0, 255, 0).astype(np.uint8), check_contrast=False)
    tifffile.imwrite(tmp_path / "masks/a.tif", labels)
    tifffile.imwrite(tmp_path / "images/b.tif", np.where(labels > 0, 4000, 100).astype(np.uint16))
    skio.imsave(tmp_path / "masks/b.png", np.where(labels > 0, 255, 0).astype(np.uint8), check_contrast=False)
    data = module(tmp_path, tile_size=16, augmentation=NO_AUGMENTATION)
    data.setup("fit")
    for dataset in (data.train_set, data.val_set):
        (sample,) = dataset.samples
        np.testing.assert_array_equal(sample.labels > 0, labels > 0)
