"""Every image type: colour and stain augmentation, modality groups and balanced sampling, binary masks as
instances, and validation by the DSB score of whole images."""

import numpy as np
import pytest
import torch
from conftest import write_pair
from torch import nn

from unetseg.io.modality import cluster_name, cluster_weights, image_features, modality_names
from unetseg.training.augment import Augmentation, Grey, Invert, StainJitter, build_transform
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule
from unetseg.training.targets import make_target


def tile(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 1.0, (32, 32, 3)).astype(np.float32)


def test_stain_jitter_is_exact_at_identity_and_stays_in_range():
    image = tile()
    jitter = StainJitter(0.05, p=1.0)
    same = jitter.apply(image, scale=np.ones(3), shift=np.zeros(3))
    np.testing.assert_allclose(same, image, atol=1e-5)  # no clipping of negative stains (unlike rgb2hed)
    moved = jitter.apply(image, scale=np.array([1.05, 0.95, 1.0]), shift=np.array([0.05, -0.05, 0.0]))
    assert moved.dtype == np.float32 and 0.0 <= moved.min() and moved.max() <= 1.0
    assert 0.005 < np.abs(moved - image).mean() < 0.2
    grey = np.repeat(image[..., :1], 1, axis=-1)
    assert jitter.apply(grey, scale=np.ones(3) * 1.05, shift=np.zeros(3)) is grey  # one channel: untouched


def test_grey_and_invert():
    image = tile()
    grey = Grey(p=1.0)(image=image)["image"]
    np.testing.assert_allclose(grey[..., 0], image.mean(axis=-1), rtol=1e-6)
    assert (grey[..., 0] == grey[..., 2]).all()
    np.testing.assert_allclose(Invert(p=1.0)(image=image)["image"], 1.0 - image)


def test_colour_pipeline_changes_rgb_tiles_reproducibly_and_keeps_masks():
    config = Augmentation(flip=0, rotate90=0, brightness_contrast=0, gamma=0, noise=0, blur=0)
    config.hue_saturation = config.stain = 1.0
    transform = build_transform(config)
    mask = np.arange(32 * 32, dtype=np.int32).reshape(32, 32)
    outputs = []
    for _ in range(2):
        transform.set_random_seed(7)
        out = transform(image=tile(), mask=mask)
        outputs.append(out["image"])
        np.testing.assert_array_equal(out["mask"], mask)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert np.abs(outputs[0] - tile()).mean() > 0.005
    with pytest.raises(ValueError, match="augmentation.invert"):
        Augmentation(invert=2.0)


def test_image_features_and_names_of_the_three_dsb_types():
    dark = np.full((3, 40, 40), 12, np.uint8)
    bright = np.full((3, 40, 40), 210, np.uint8)
    pink = np.stack([np.full((40, 40), value, np.uint8) for value in (220, 120, 190)])
    features = np.stack([image_features(image) for image in (dark, bright, pink)])
    np.testing.assert_allclose(features[0], [12 / 255, 0.0])
    np.testing.assert_allclose(features[2], [530 / 3 / 255, 100 / 255])
    assert modality_names(features) == ["fluorescence", "grey brightfield", "colour (stained)"]
    assert cluster_name(features[[0, 0, 0, 1]]) == "fluorescence"  # a group is named by its mean


def test_cluster_weights_balance_groups():
    assigned = [0] * 90 + [1] * 9 + [2]
    even = cluster_weights(assigned, 1.0)
    assert [even[np.array(assigned) == c].sum() for c in range(3)] == pytest.approx([1 / 3] * 3)
    plain = cluster_weights(assigned, 0.0)
    np.testing.assert_allclose(plain, 0.01)  # every image alike
    root = cluster_weights(assigned, 0.5)
    shares = np.array([root[np.array(assigned) == c].sum() for c in range(3)])
    np.testing.assert_allclose(shares, np.sqrt([90, 9, 1]) / np.sqrt([90, 9, 1]).sum())
    with pytest.raises(ValueError, match="modality_balance"):
        cluster_weights(assigned, 1.5)


def write_typed_dataset(root, fluorescence=6, brightfield=2):
    rows, cols = np.mgrid[:48, :48]
    for index in range(fluorescence + brightfield):
        labels = np.zeros((48, 48), np.uint16)
        labels[(rows - 24) ** 2 + (cols - 20) ** 2 <= 36] = 1
        labels[(rows - 24) ** 2 + (cols - 30) ** 2 <= 36] = 2  # touches 1
        bright = index >= fluorescence
        inside = 40 if bright else 200
        image = np.where(labels > 0, inside, 230 if bright else 15).astype(np.uint8)
        write_pair(root, f"{'b' if bright else 'f'}{index}", image, labels)
    return root


def test_modality_balance_draws_the_rare_type_as_often(tmp_path):
    root = write_typed_dataset(tmp_path)
    split = tmp_path / "split.json"
    split.write_text('{"train": ["f0", "f1", "f2", "f3", "f4", "b6"], "val": ["f5", "b7"]}')
    data = SegmentationDataModule(
        root=str(root),
        tile_size=32,
        batch_size=2,
        tiles_per_epoch=4,
        num_workers=0,
        split_file=str(split),
        modality_balance=1.0,
    )
    data.setup()
    assert data.modalities == {
        "f0": "fluorescence",
        "f1": "fluorescence",
        "f2": "fluorescence",
        "f3": "fluorescence",
        "f4": "fluorescence",
        "b6": "grey brightfield",
    }
    rng = np.random.default_rng(0)
    drawn = [data.train_set.samples[data.train_set.random_tile(rng)[0]].name for _ in range(2000)]
    assert drawn.count("b6") / len(drawn) == pytest.approx(0.5, abs=0.05)
    assert "labels" in data.val_set[0] and "labels" not in data.train_set[0]


def test_binary_masks_become_connected_components(tmp_path):
    labels = np.zeros((48, 48), np.uint8)
    labels[5:15, 5:15] = 255
    labels[5:15, 30:40] = 255  # two separate objects in a 0/255 mask
    for name in ("a", "b"):
        write_pair(tmp_path, name, np.where(labels > 0, 200, 20).astype(np.uint8), labels)
    data = SegmentationDataModule(root=str(tmp_path), tile_size=48, batch_size=2, tiles_per_epoch=2, num_workers=0)
    data.setup()
    sample = data.train_set.samples[0]
    assert sorted(np.unique(sample.labels)) == [0, 1, 2]
    np.testing.assert_array_equal(data.val_set[0]["labels"].numpy() > 0, labels > 0)


class Oracle(nn.Module):
    """Three-class logits read from the target stored in the image channels."""

    classes = 3

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, image):
        return image * self.scale


def test_validation_logs_the_dsb_score_of_whole_images():
    labels = torch.zeros(1, 32, 32, dtype=torch.int32)
    labels[0, 4:14, 4:14] = 1
    labels[0, 4:14, 14:24] = 2
    target = torch.from_numpy(make_target(labels[0].numpy(), "boundary"))[None]
    image = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    module = SegmentationModule(Oracle())
    logged = {}
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda values, **kwargs: logged.update(values)
    module.validation_step({"image": image, "target": target, "labels": labels}, 0)
    module.on_validation_epoch_end()
    assert logged["val/dsb"] == pytest.approx(1.0) and logged["val/f1"] == pytest.approx(1.0)
    assert "val/dice" in logged
