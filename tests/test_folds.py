"""k-fold cross-validation: deterministic, stratified splits; every image out of fold exactly once; the data
module's folds stored in the run."""

import json

import numpy as np
import pytest
import tifffile

from unetseg.training.data import SegmentationDataModule
from unetseg.training.folds import assign_folds, fold_split

NAMES = [f"img_{i:03d}" for i in range(23)]
GROUPS = ["fluorescence"] * 15 + ["colour (stained)"] * 5 + ["grey brightfield"] * 3


def test_every_image_is_out_of_fold_exactly_once():
    assigned = assign_folds(NAMES, GROUPS, 5, seed=0)
    assert sorted(assigned) == NAMES
    val = [name for fold in range(5) for name in fold_split(assigned, fold)["val"]]
    assert sorted(val) == NAMES  # each image validates in exactly one fold
    for fold in range(5):
        split = fold_split(assigned, fold)
        assert not set(split["train"]) & set(split["val"])
        assert set(split["train"]) | set(split["val"]) == set(NAMES)
    sizes = [len(fold_split(assigned, fold)["val"]) for fold in range(5)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 23


def test_folds_are_deterministic_by_seed():
    assert assign_folds(NAMES, GROUPS, 5, seed=0) == assign_folds(list(reversed(NAMES)), list(reversed(GROUPS)), 5)
    assert any(assign_folds(NAMES, GROUPS, 5, seed=s) != assign_folds(NAMES, GROUPS, 5) for s in (1, 2, 3))


def test_folds_are_stratified_by_image_type():
    assigned = assign_folds(NAMES, GROUPS, 5, seed=4)
    for group, count in (("fluorescence", 15), ("colour (stained)", 5), ("grey brightfield", 3)):
        per_fold = np.bincount([assigned[n] for n, g in zip(NAMES, GROUPS) if g == group], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count, (group, per_fold)


def test_impossible_folds_are_refused_with_the_option_named():
    with pytest.raises(ValueError, match="data.folds must be an integer >= 2"):
        assign_folds(NAMES, GROUPS, 1)
    with pytest.raises(ValueError, match="3 images cannot make 5 folds"):
        assign_folds(NAMES[:3], GROUPS[:3], 5)
    with pytest.raises(ValueError, match="data.fold must be an integer in 0..4"):
        fold_split(assign_folds(NAMES, GROUPS, 5), 5)
    with pytest.raises(ValueError, match="data.folds and data.split_file"):
        SegmentationDataModule(folds=5, split_file="split.json")


def test_the_data_module_validates_on_its_fold_and_stratifies_grey_and_colour(tmp_path):
    """Grey and colour images in one folder: each type is spread over both folds, and the run stores the
    assignment of every image."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(8):
        mask = np.zeros((64, 64), np.uint16)
        mask[10:30, 10:30], mask[40:55, 35:60] = 1, 2
        grey = rng.integers(0, 40, (64, 64)).astype(np.uint8) + (mask > 0) * 200
        image = np.stack([grey, grey // 3, 255 - grey], axis=-1) if i % 2 else grey.astype(np.uint8)
        tifffile.imwrite(tmp_path / "images" / f"p{i}.tif", image.astype(np.uint8))
        tifffile.imwrite(tmp_path / "masks" / f"p{i}.tif", mask)
    splits = []
    for fold in (0, 1):
        data = SegmentationDataModule(str(tmp_path), in_channels=3, tile_size=32, folds=2, fold=fold, num_workers=0)
        data.setup("fit")
        splits.append(data.split)
        assert data.split["folds"] == 2 and data.split["fold"] == fold
        colour = {f"p{i}" for i in range(1, 8, 2)}
        assert 0 < len(set(data.split["val"]) & colour) < 4  # colour images in both folds
    assert sorted(splits[0]["val"] + splits[1]["val"]) == [f"p{i}" for i in range(8)]
    assert splits[0]["assigned"] == splits[1]["assigned"]
    json.dumps(splits[0])  # stored in the run as split.json
