"""The volumetric tiled engine: identity exactness for sizes that are not multiples of the tile, `center`
equal to a whole-volume forward pass, slabs that cover every plane once, and a 3-D U-Net through it."""

import numpy as np
import pytest
import torch
from conftest import conv_stack as conv_stack_nd
from conftest import first_channel_model as first_channel_model_nd
from torch import nn

from unetseg.inference import predict_tiled
from unetseg.inference.tiling import BLENDS, PAD_MODES
from unetseg.inference.volume import iter_predict_slabs, per_axis, predict_volume_tiled
from unetseg.models import UNet

RADIUS = 3  # three 3x3x3 convolutions


def first_channel_model(in_channels=2):
    return first_channel_model_nd(in_channels, dims=3)


def conv_stack(in_channels=2, classes=1, width=4, seed=0):
    return conv_stack_nd(in_channels, classes, width, seed, dims=3)


def random_volume(channels, *shape, seed=1):
    return np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)


def whole_volume_probs(model, volume):
    with torch.no_grad():
        logits = model(torch.as_tensor(volume)[None])[0]
    return (torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)).numpy()


def interior(array, radius=RADIUS):
    return array[..., radius:-radius, radius:-radius, radius:-radius]


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("shape", [(13, 37, 29), (5, 9, 40), (1, 1, 1), (30, 8, 8)])
def test_identity_model_gives_the_volume_back(blend, shape):
    volume = random_volume(2, *shape)
    probs = predict_volume_tiled(
        first_channel_model(), volume, tile_size=(8, 16, 16), overlap=(2, 6, 6), batch_size=3, blend=blend
    )
    expected = 1.0 / (1.0 + np.exp(-volume[:1].astype(np.float64)))
    assert probs.shape == (1, *shape) and probs.dtype == np.float32
    if blend == "center":  # each voxel from one tile, untouched
        np.testing.assert_array_max_ulp(probs, torch.sigmoid(torch.from_numpy(volume[:1])).numpy(), maxulp=1)
    else:
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("shape", [(19, 30, 27), (9, 41, 22)])
def test_center_blend_equals_a_whole_volume_forward_pass(pad_mode, shape):
    model = conv_stack()
    volume = random_volume(2, *shape)
    probs = predict_volume_tiled(
        model, volume, tile_size=(10, 14, 16), overlap=2 * RADIUS, blend="center", pad_mode=pad_mode, batch_size=5
    )
    np.testing.assert_allclose(interior(probs), interior(whole_volume_probs(model, volume)), rtol=0, atol=1e-5)


def test_center_blend_is_not_exact_when_the_overlap_is_too_small():
    model = conv_stack()
    volume = random_volume(2, 19, 30, 27)
    probs = predict_volume_tiled(model, volume, tile_size=10, overlap=2, blend="center")
    assert np.abs(interior(probs) - interior(whole_volume_probs(model, volume))).max() > 1e-4


def test_center_blend_of_a_3d_unet_equals_the_whole_volume():
    # Depth 1, pooling in-plane only: receptive radius 6 along Z (three pairs of convolutions), 10 in-plane.
    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=3, depth=1, width=2, spatial_dims=3, pool=[[1, 2, 2]], norm="none").eval()
    volume = random_volume(1, 30, 40, 36)
    probs = predict_volume_tiled(net, volume, tile_size=(16, 32, 32), overlap=(12, 20, 20), blend="center")
    whole = whole_volume_probs(net, volume)
    np.testing.assert_allclose(probs[:, 6:-6, 10:-10, 10:-10], whole[:, 6:-6, 10:-10, 10:-10], atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_gaussian_and_mean_blends_are_close_to_the_whole_volume(blend):
    model = conv_stack()
    volume = random_volume(2, 20, 30, 26)
    probs = predict_volume_tiled(model, volume, tile_size=(12, 16, 16), overlap=(6, 8, 8), blend=blend)
    # Tile edges (zero-padded convolutions) in three axes: looser than in 2-D, and gaussian beats mean.
    assert np.abs(interior(probs) - interior(whole_volume_probs(model, volume))).max() < (
        2e-2 if blend == "gaussian" else 1e-1
    )


def test_predict_tiled_takes_volumes_to_the_slab_engine():
    model = conv_stack()
    volume = random_volume(2, 12, 20, 18)
    kwargs = dict(tile_size=(8, 16, 16), overlap=(2, 6, 6), blend="center")
    np.testing.assert_array_equal(predict_tiled(model, volume, **kwargs), predict_volume_tiled(model, volume, **kwargs))


def test_slabs_are_ordered_cover_every_plane_once_and_equal_the_whole_prediction():
    model = conv_stack(classes=2)
    volume = random_volume(2, 41, 20, 18)
    kwargs = dict(tile_size=(8, 16, 16), overlap=(2, 4, 4), batch_size=2)
    slabs = list(iter_predict_slabs(model, volume, **kwargs))
    assert len(slabs) > 3 and slabs[0][0] == 0 and slabs[-1][1] == 41
    assert all(previous[1] == following[0] for previous, following in zip(slabs, slabs[1:]))
    assert all(slab.shape == (2, stop - start, 20, 18) for start, stop, slab in slabs)
    np.testing.assert_array_equal(
        np.concatenate([slab for _, _, slab in slabs], axis=1), predict_volume_tiled(model, volume, **kwargs)
    )


def test_slabs_read_the_input_slab_by_slab():
    reads = []

    class Recorder:
        shape = (1, 40, 12, 12)

        def __getitem__(self, key):
            reads.append(key[1])
            return np.zeros((1, key[1].stop - key[1].start, 12, 12), np.float32)

    list(iter_predict_slabs(first_channel_model(1), Recorder(), tile_size=(8, 16, 16), overlap=(2, 4, 4), batch_size=1))
    assert len(reads) > 3 and max(read.stop - read.start for read in reads) <= 8


def test_tta_with_in_plane_turns_of_a_3d_model():
    model = conv_stack(in_channels=1)
    volume = random_volume(1, 12, 20, 20)
    expected = []
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(volume[..., ::-1] if flip else volume, k, axes=(2, 3)).copy()
            probs = np.rot90(whole_volume_probs(model, view), -k, axes=(2, 3))
            expected.append(probs[..., ::-1] if flip else probs)
    augmented = predict_volume_tiled(model, volume, tile_size=(8, 12, 12), overlap=6, blend="center", tta=True)
    np.testing.assert_allclose(interior(augmented), interior(np.mean(expected, axis=0)), atol=1e-5)


def test_bad_settings_and_2d_models_are_named():
    volume = random_volume(2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"tile_size must be an integer or 3 integers \(Z, Y, X\)"):
        predict_volume_tiled(first_channel_model(), volume, tile_size=(8, 8))
    with pytest.raises(ValueError, match="overlap must be an integer with 0 <= overlap < tile_size"):
        predict_volume_tiled(first_channel_model(), volume, tile_size=8, overlap=(2, 8, 2))
    with pytest.raises(ValueError, match="needs tile_size square in Y and X"):
        predict_volume_tiled(first_channel_model(), volume, tile_size=(8, 8, 16), overlap=2, tta=True)
    with pytest.raises(ValueError, match=r"volume must have shape \(C, Z, Y, X\)"):
        predict_volume_tiled(first_channel_model(), volume[0], tile_size=8, overlap=2)
    flat = nn.Conv2d(2, 1, 1)
    with pytest.raises((ValueError, RuntimeError)):
        predict_volume_tiled(flat, volume, tile_size=8, overlap=2)
    assert per_axis(5, "tile_size") == (5, 5, 5)
