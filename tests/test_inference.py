import numpy as np
import pytest
import tifffile
import torch
from conftest import conv_stack, first_channel_model
from torch import nn

from unetseg.inference import autocast_dtype, iter_predict_bands, predict_tiled, select_device
from unetseg.inference.tiling import BLENDS, PAD_MODES
from unetseg.io import Normalization

RADIUS = 3  # receptive field radius of conv_stack(): three 3x3 convolutions


def symmetric_model():
    """A model that commutes with every flip and quarter turn: a 3x3 kernel invariant under them."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Tanh(), nn.Conv2d(1, 1, 3, padding=1))
    with torch.no_grad():
        for conv, (corner, edge, centre) in zip(model[::2], [(0.3, -0.7, 1.1), (0.5, 0.2, -0.4)]):
            conv.weight[:] = torch.tensor([[corner, edge, corner], [edge, centre, edge], [corner, edge, corner]])
    return model


def whole_image_probs(model, image):
    """Reference: the model run once on the whole image."""
    with torch.no_grad():
        logits = model(torch.as_tensor(image)[None])[0]
    return (torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)).numpy()


def random_image(channels, height, width, seed=1):
    return np.random.default_rng(seed).normal(size=(channels, height, width)).astype(np.float32)


def interior(array):
    return array[..., RADIUS:-RADIUS, RADIUS:-RADIUS]


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("shape", [(70, 90), (33, 32), (5, 3), (1, 1), (100, 12)])
def test_identity_model_gives_the_whole_image_back(blend, shape):
    image = random_image(2, *shape)
    probs = predict_tiled(first_channel_model(), image, tile_size=32, overlap=8, batch_size=3, blend=blend)
    expected = 1.0 / (1.0 + np.exp(-image[:1].astype(np.float64)))
    assert probs.shape == (1, *shape) and probs.dtype == np.float32
    if blend == "center":  # each pixel comes from one tile, untouched: sigmoid's own rounding only
        np.testing.assert_array_max_ulp(probs, torch.sigmoid(torch.from_numpy(image[:1])).numpy(), maxulp=1)
    else:
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("overlap", [2 * RADIUS, 2 * RADIUS + 1, 12])
@pytest.mark.parametrize("shape", [(75, 61), (40, 100)])
def test_center_blend_is_exact_when_the_receptive_field_fits_in_half_the_overlap(pad_mode, overlap, shape):
    model = conv_stack()
    image = random_image(2, *shape)
    probs = predict_tiled(model, image, tile_size=24, overlap=overlap, blend="center", pad_mode=pad_mode)
    np.testing.assert_allclose(interior(probs), interior(whole_image_probs(model, image)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(75, 61), (24, 24), (200, 30)])
def test_center_blend_is_exact_up_to_the_borders_without_mirrored_context(shape):
    # Tiles lie flush with the image borders, so a border pixel sees the convolutions' own zero
    # padding, as in the whole-image forward pass: exact everywhere, not only in the interior.
    model = conv_stack()
    image = random_image(2, *shape)
    probs = predict_tiled(model, image, tile_size=24, overlap=2 * RADIUS, blend="center", amp=False)
    np.testing.assert_allclose(probs, whole_image_probs(model, image), rtol=0, atol=1e-5)


def test_auto_precision_runs_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    from unetseg.runtime import precision

    model = conv_stack(width=8)
    image = random_image(2, 60, 50)
    full = predict_tiled(model, image, tile_size=32, overlap=8)  # the suite's CPU counts as without bf16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    auto = predict_tiled(model, image, tile_size=32, overlap=8)
    np.testing.assert_array_equal(auto, predict_tiled(model, image, tile_size=32, overlap=8, amp=True))
    assert 0 < np.abs(auto - full).max() < 3e-2


def test_center_blend_is_not_exact_when_the_overlap_is_too_small():
    model = conv_stack()
    image = random_image(2, 75, 61)
    probs = predict_tiled(model, image, tile_size=24, overlap=2 * RADIUS - 2, blend="center")
    assert np.abs(interior(probs) - interior(whole_image_probs(model, image))).max() > 1e-4


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_gaussian_and_mean_blends_are_close_to_the_whole_image(blend):
    model = conv_stack()
    image = random_image(2, 90, 70)
    probs = predict_tiled(model, image, tile_size=32, overlap=8, blend=blend)
    error = np.abs(interior(probs) - interior(whole_image_probs(model, image))).max()
    assert error < (1e-2 if blend == "gaussian" else 6e-2)  # mean: tile edges weigh as much as centres


def test_several_classes_give_softmax_probabilities_summing_to_one():
    model = conv_stack(classes=3)
    image = random_image(2, 50, 45)
    probs = predict_tiled(model, image, tile_size=24, overlap=8, blend="center")
    assert probs.shape == (3, 50, 45)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(interior(probs), interior(whole_image_probs(model, image)), atol=1e-5)


def test_tta_with_an_equivariant_model_changes_nothing():
    model = symmetric_model()
    image = random_image(1, 45, 38)
    plain = predict_tiled(model, image, tile_size=16, overlap=6, blend="gaussian")
    augmented = predict_tiled(model, image, tile_size=16, overlap=6, blend="gaussian", tta=True)
    np.testing.assert_allclose(augmented, plain, atol=1e-5)


def test_tta_averages_the_eight_flips_and_quarter_turns():
    model = conv_stack(in_channels=1)
    image = random_image(1, 40, 40)
    expected = []
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(image[:, :, ::-1] if flip else image, k, axes=(1, 2)).copy()
            probs = np.rot90(whole_image_probs(model, view), -k, axes=(1, 2))
            expected.append(probs[:, :, ::-1] if flip else probs)
    augmented = predict_tiled(model, image, tile_size=16, overlap=8, blend="center", tta=True)
    np.testing.assert_allclose(interior(augmented), interior(np.mean(expected, axis=0)), atol=1e-5)
    plain = predict_tiled(model, image, tile_size=16, overlap=8, blend="center")
    assert np.abs(interior(augmented) - interior(plain)).max() > 1e-3  # the model is not equivariant


@pytest.mark.parametrize("shape, tile_size, overlap", [((200, 37), 32, 8), ((61, 500), 32, 8), ((30, 25), 16, 14)])
def test_bands_are_ordered_cover_every_row_once_and_equal_the_full_prediction(shape, tile_size, overlap):
    model = conv_stack(classes=2)
    image = random_image(2, *shape)
    kwargs = dict(tile_size=tile_size, overlap=overlap, batch_size=4)
    bands = list(iter_predict_bands(model, image, **kwargs))
    assert bands[0][0] == 0 and bands[-1][1] == shape[0]
    assert all(previous[1] == following[0] for previous, following in zip(bands, bands[1:]))
    assert all(band.shape == (2, stop - start, shape[1]) for start, stop, band in bands)
    stitched = np.concatenate([band for _, _, band in bands], axis=1)
    np.testing.assert_array_equal(stitched, predict_tiled(model, image, **kwargs))


def test_tall_images_are_processed_in_several_bands():
    bands = list(iter_predict_bands(first_channel_model(), random_image(2, 300, 100), tile_size=32, overlap=8))
    assert len(bands) > 3 and max(stop - start for start, stop, _ in bands) <= 100


def test_narrow_images_still_fill_batches():
    calls = []
    model = first_channel_model()
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    predict_tiled(model, random_image(2, 200, 20), tile_size=32, overlap=8, batch_size=5)
    assert calls[:-1] and all(size == 5 for size in calls[:-1])  # 9 tiles in one column: 5 + 4


def test_output_is_written_into_a_memmap(tmp_path):
    model = conv_stack()
    image = random_image(2, 70, 50)
    out = tifffile.memmap(tmp_path / "probs.tif", shape=(1, 70, 50), dtype=np.float32)
    result = predict_tiled(model, image, tile_size=24, overlap=8, out=out)
    assert result is out
    out.flush()
    del out, result
    expected = predict_tiled(model, image, tile_size=24, overlap=8)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "probs.tif"), expected)


def test_wrong_out_shape_is_refused():
    with pytest.raises(ValueError, match=r"out must have shape \(1, 20, 30\)"):
        out = np.zeros((2, 20, 30))
        predict_tiled(first_channel_model(), random_image(2, 20, 30), tile_size=16, overlap=4, out=out)


def test_raw_bands_from_a_tiff_memmap_are_normalised_band_by_band(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 4000, size=(1, 150, 60), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "raw.tif", raw[0])
    normalization = Normalization()
    value_range = normalization.range(raw)
    band_heights = []

    def normalize(band):
        band_heights.append(band.shape[1])
        return normalization.apply(band, value_range)

    model = conv_stack(in_channels=1)
    source = tifffile.memmap(tmp_path / "raw.tif", mode="r")[None]  # (1, H, W) view, read lazily
    probs = predict_tiled(model, source, tile_size=32, overlap=8, normalize=normalize)
    expected = predict_tiled(model, normalization(raw), tile_size=32, overlap=8)
    np.testing.assert_array_equal(probs, expected)
    assert len(band_heights) > 1 and max(band_heights) < 150


def test_torch_and_numpy_images_agree():
    model = conv_stack()
    image = random_image(2, 40, 30)
    np.testing.assert_array_equal(
        predict_tiled(model, torch.from_numpy(image), tile_size=16, overlap=6),
        predict_tiled(model, image, tile_size=16, overlap=6),
    )


def test_the_model_runs_in_eval_mode_and_keeps_its_training_flag():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Conv2d(2, 1, 1))
    image = random_image(1, 40, 40)
    model.train()
    first = predict_tiled(model, image, tile_size=16, overlap=4)
    assert model.training
    second = predict_tiled(model, image, tile_size=16, overlap=4)
    np.testing.assert_array_equal(first, second)  # no dropout, no batch statistics
    assert torch.is_grad_enabled()  # inference mode does not leak out
    model.eval()
    np.testing.assert_array_equal(predict_tiled(model, image, tile_size=16, overlap=4), first)
    assert not model.training


def test_grad_mode_does_not_leak_between_bands():
    for _ in iter_predict_bands(first_channel_model(), random_image(2, 200, 40), tile_size=32, overlap=8):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_a_model_changing_the_tile_size_is_refused():
    model = nn.Conv2d(1, 1, 3)  # no padding: 2 pixels smaller
    with pytest.raises(ValueError, match=r"logits \(N, classes, 16, 16\).*returned \(\d+, 1, 14, 14\)"):
        predict_tiled(model, random_image(1, 30, 30), tile_size=16, overlap=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 32, "overlap": 32}, "overlap must be an integer with 0 <= overlap < tile_size"),
        ({"blend": "max"}, "blend must be one of gaussian, mean, center; got 'max'"),
        ({"pad_mode": "zeros"}, "pad_mode must be one of reflect, symmetric, edge; got 'zeros'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_options_are_refused_with_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict_tiled(first_channel_model(), random_image(2, 20, 20), **{"tile_size": 16, "overlap": 4, **kwargs})


@pytest.mark.parametrize("shape", [(20, 20), (1, 2, 20, 20), (2, 0, 20)])
def test_images_not_shaped_channels_height_width_are_refused(shape):
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\)"):
        predict_tiled(first_channel_model(), np.zeros(shape, np.float32), tile_size=16, overlap=4)


def test_select_device_follows_the_model_and_refuses_another_device():
    assert select_device(first_channel_model()) == torch.device("cpu")
    assert select_device(nn.Identity()) == torch.device("cpu")
    assert select_device(nn.Identity(), "meta") == torch.device("meta")
    assert select_device(first_channel_model(), "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device meta differs from the model's device cpu"):
        select_device(first_channel_model(), "meta")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_dtype_on_cuda_prefers_bfloat16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert autocast_dtype(torch.device("cuda")) is expected
    assert autocast_dtype(torch.device("cuda", 0), amp=True) is expected
    assert autocast_dtype(torch.device("cuda"), amp=False) is None


def test_autocast_dtype_on_cpu_is_off_by_default_and_bfloat16_on_request():
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), amp=True) is torch.bfloat16


def test_amp_runs_the_autocast_path_and_stays_close():
    model = conv_stack(width=8)
    image = random_image(2, 60, 50)
    full = predict_tiled(model, image, tile_size=32, overlap=8)
    mixed = predict_tiled(model, image, tile_size=32, overlap=8, amp=True)
    assert mixed.dtype == np.float32
    assert 0 < np.abs(mixed - full).max() < 3e-2  # differs: bfloat16 really ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp, atol", [(False, 1e-4), (None, 3e-2)])
def test_cuda_matches_cpu(amp, atol):
    model = conv_stack(classes=3, width=8)
    image = random_image(2, 300, 270)
    kwargs = dict(tile_size=64, overlap=16, batch_size=4, tta=True)
    expected = predict_tiled(model, image, **kwargs)
    probs = predict_tiled(model.cuda(), torch.from_numpy(image).cuda(), amp=amp, **kwargs)
    np.testing.assert_allclose(probs, expected, atol=atol)


def test_tta_runs_at_most_batch_size_tiles_a_forward_pass():
    """The 8 views of TTA go through the network batch_size tiles at a time (not 8 x batch_size: 8x the
    activation memory, and slower on a CPU), with the same probabilities as the views in one batch."""
    model = conv_stack(in_channels=1, seed=3)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    image = np.random.default_rng(0).normal(size=(1, 96, 96)).astype(np.float32)
    chunked = predict_tiled(model, image, tile_size=32, overlap=8, batch_size=3, tta=True, amp=False)
    assert max(seen) == 3 and sum(seen) == 8 * 16  # 4 x 4 tiles, 8 views each
    seen.clear()
    whole = predict_tiled(model, image, tile_size=32, overlap=8, batch_size=64, tta=True, amp=False)
    assert max(seen) > 8 * 3  # the views of more than 3 tiles in one pass
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
