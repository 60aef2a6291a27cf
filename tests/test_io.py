"""Reading images and masks, channel conversion, whole-image percentile normalisation, atomic TIFF writes."""

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from unetseg.io import (
    ImageReadError,
    Normalization,
    read_image,
    read_labels,
    to_channels,
    write_tiff,
)
from unetseg.io.normalize import value_range


def save_png(path, array):
    skio.imsave(path, array, check_contrast=False)
    return path


def ramp(height=6, width=5, dtype=np.uint8, scale=1):
    return (np.arange(height * width).reshape(height, width) * scale).astype(dtype)


# Reading images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3), (6, 5, 4)], ids=["grey", "rgb", "rgba"])
def test_read_png_keeps_shape_dtype_and_values(tmp_path, shape):
    array = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    image = read_image(save_png(tmp_path / "a.png", array))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, array)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_read_tiff_keeps_dtype_and_values(tmp_path, dtype):
    array = (np.random.default_rng(0).random((7, 9)) * 4000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", array)
    image = read_image(tmp_path / "a.tif")
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, array)


def test_read_16_bit_png(tmp_path):
    array = ramp(dtype=np.uint16, scale=1000)
    image = read_image(save_png(tmp_path / "a.png", array))
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, array)


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageReadError, match="empty.png: file is empty"):
        read_image(path)


@pytest.mark.parametrize("name", ["notes.png", "notes.tif"])
def test_text_file_with_image_suffix_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert str(path) in str(error.value)
    assert "cannot read image" in str(error.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.tif: no such file"):
        read_image(tmp_path / "nothere.tif")


def test_image_read_error_is_a_value_error():
    assert issubclass(ImageReadError, ValueError)


# Channels -------------------------------------------------------------------------------------------------------------


def test_grey_to_three_channels_repeats():
    grey = ramp()
    out = to_channels(grey, 3)
    assert out.shape == (3, 6, 5) and out.dtype == np.uint8
    for channel in out:
        np.testing.assert_array_equal(channel, grey)


def test_rgb_to_one_channel_is_the_rounded_mean():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (10, 20, 31)  # mean 20.33
    rgb[1, 1] = (255, 255, 254)  # mean 254.67
    out = to_channels(rgb, 1)
    assert out.shape == (1, 2, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [[20, 0], [0, 255]])


def test_rgb_to_one_channel_float_keeps_fractions():
    rgb = np.zeros((1, 1, 3), np.float32)
    rgb[0, 0] = (0.1, 0.2, 0.4)
    np.testing.assert_allclose(to_channels(rgb, 1)[0, 0, 0], 0.7 / 3, rtol=1e-6)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_rgba_drops_alpha(in_channels):
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[..., 3] = 255  # an alpha that would shift the mean if kept
    out = to_channels(rgba, in_channels)
    assert out.shape == (in_channels, 3, 4)
    assert (out == 90).all()


def test_channels_last_becomes_channels_first():
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 3)).astype(np.uint8)
    out = to_channels(rgb, 3)
    assert out.shape == (3, 4, 5) and out.flags.c_contiguous
    np.testing.assert_array_equal(out[2], rgb[..., 2])


def test_two_channel_image_is_refused_naming_the_file():
    with pytest.raises(ImageReadError) as error:
        to_channels(np.zeros((4, 5, 2), np.uint8), 1, path="two.tif")
    assert "two.tif" in str(error.value) and "(4, 5, 2)" in str(error.value)


def test_rgb_into_two_channels_is_refused():
    with pytest.raises(ImageReadError, match="rgb.png: has 3 channels, the model expects 2"):
        to_channels(np.zeros((4, 5, 3), np.uint8), 2, path="rgb.png")


# Masks ----------------------------------------------------------------------------------------------------------------


def test_binary_0_255_png_mask(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:7] = 255
    labels = read_labels(save_png(tmp_path / "m.png", mask))
    assert labels.dtype == np.int32 and labels.shape == (8, 8)
    np.testing.assert_array_equal(labels, mask.astype(np.int32))


def test_instance_label_tiff(tmp_path):
    labels = np.zeros((10, 10), np.uint16)
    labels[1:3, 1:3], labels[5:9, 5:9], labels[0, 9] = 1, 2, 700
    tifffile.imwrite(tmp_path / "m.tif", labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "m.tif"), labels)


@pytest.mark.parametrize("channels", [3, 4])
def test_grey_mask_stored_as_rgb(tmp_path, channels):
    grey = np.zeros((6, 6), np.uint8)
    grey[1:4, 2:5] = 255
    stacked = np.stack([grey] * 3 + [np.full_like(grey, 255)] * (channels - 3), axis=-1)
    np.testing.assert_array_equal(read_labels(save_png(tmp_path / "m.png", stacked)), grey)


def test_colour_mask_is_refused_naming_the_file(tmp_path):
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[1:3, 1:3] = (255, 0, 0)
    path = save_png(tmp_path / "colour.png", colour)
    with pytest.raises(ImageReadError) as error:
        read_labels(path)
    assert str(path) in str(error.value) and "colour" in str(error.value)


def test_negative_mask_is_refused_naming_the_file(tmp_path):
    labels = np.zeros((5, 5), np.int16)
    labels[2, 2] = -1
    tifffile.imwrite(tmp_path / "negative.tif", labels)
    with pytest.raises(ImageReadError) as error:
        read_labels(tmp_path / "negative.tif")
    assert "negative.tif" in str(error.value) and "negative values" in str(error.value)


@pytest.mark.parametrize("bad", [0.5, -2.0, np.nan])
def test_float_mask_with_fractions_negatives_or_nan_is_refused(tmp_path, bad):
    labels = np.zeros((5, 5), np.float32)
    labels[1, 1] = bad
    tifffile.imwrite(tmp_path / "fraction.tif", labels)
    with pytest.raises(ImageReadError) as error:
        read_labels(tmp_path / "fraction.tif")
    assert "fraction.tif" in str(error.value) and "whole numbers" in str(error.value)


def test_float_mask_of_whole_numbers_is_accepted(tmp_path):
    labels = np.array([[0, 1], [2, 3]], np.float32)
    tifffile.imwrite(tmp_path / "m.tif", labels)
    out = read_labels(tmp_path / "m.tif")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 1], [2, 3]])


def test_stack_mask_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(ImageReadError, match=r"stack.tif: a mask must be 2D"):
        read_labels(tmp_path / "stack.tif")


# Normalisation --------------------------------------------------------------------------------------------------------


def percentile_reference(image, low, high):
    return tuple(float(np.percentile(image, q, method="lower")) for q in (low, high))


def test_16_bit_normalisation_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (123, 77)).astype(np.uint16)
    image[:5, :5] = 4095  # a few bright outliers
    norm = Normalization(low=1.0, high=99.8)
    low, high = percentile_reference(image, 1.0, 99.8)
    assert norm.range(image) == (low, high)
    expected = np.clip((image.astype(np.float64) - low) / (high - low), 0, 1)
    out = norm(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("dtype, size", [(np.uint8, 1), (np.uint8, 2), (np.uint8, 1001), (np.uint16, 10_007)])
@pytest.mark.parametrize("low, high", [(0.0, 100.0), (1.0, 99.8), (3.0, 97.0), (50.0, 50.5)])
def test_histogram_percentiles_equal_numpy_lower(dtype, size, low, high):
    top = np.iinfo(dtype).max
    image = np.random.default_rng(size).integers(0, top + 1, size).astype(dtype)
    assert value_range([(0, image[None])], (1, size), low, high) == percentile_reference(image, low, high)


def test_tile_uses_whole_image_range_not_its_own():
    # Left half dim (0..200), right half bright (3000..4095): a per-tile stretch would map
    # the dim tile to 0..1, the whole-image range keeps it dark.
    rng = np.random.default_rng(1)
    image = np.concatenate([rng.integers(0, 200, (64, 64)), rng.integers(3000, 4096, (64, 64))], axis=1)
    image = image.astype(np.uint16)
    norm = Normalization()
    value_range = norm.range(image)
    dim_tile = image[:, :64]
    whole = norm.apply(dim_tile, value_range)
    per_tile = norm(dim_tile)
    assert whole.max() < 0.06  # 200 / ~4090
    assert per_tile.max() == pytest.approx(1.0)
    assert np.abs(whole - per_tile).mean() > 0.3
    np.testing.assert_allclose(whole, norm(image)[:, :64], atol=1e-7)


def test_normalisation_clips_to_unit_range_or_not():
    image = np.arange(1000, dtype=np.uint16)
    clipped = Normalization(low=10, high=90)(image)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    assert (clipped == 0).sum() > 1 and (clipped == 1).sum() > 1
    unclipped = Normalization(low=10, high=90, clip=False)(image)
    assert unclipped.min() < -0.1 and unclipped.max() > 1.1
    mid = Normalization(low=10, high=90, clip=False)
    value_range = mid.range(image)
    assert value_range == (99.0, 899.0)
    assert unclipped[499] == pytest.approx((499 - 99) / 800)


def test_normalisation_does_not_modify_float_input():
    image = np.linspace(0, 10, 100, dtype=np.float32)
    before = image.copy()
    Normalization()(image)
    np.testing.assert_array_equal(image, before)


def test_constant_image_does_not_divide_by_zero():
    out = Normalization()(np.full((4, 4), 7, np.uint16))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("low, high", [(-1, 99), (50, 50), (60, 40), (1, 101)])
def test_bad_percentiles_are_refused(low, high):
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        Normalization(low=low, high=high)


def test_normalisation_to_dict():
    assert Normalization(low=2.0, high=98.0).to_dict() == {"low": 2.0, "high": 98.0, "clip": True}


# Writing --------------------------------------------------------------------------------------------------------------


def test_write_tiff_is_atomic_and_reads_back(tmp_path):
    array = np.random.default_rng(0).random((3, 17, 19)).astype(np.float32)
    path = write_tiff(tmp_path / "out" / "probs.tif", array, compression="zlib")
    assert path == tmp_path / "out" / "probs.tif"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probs.tif"]
    np.testing.assert_array_equal(tifffile.imread(path), array)
    write_tiff(path, array[0])  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probs.tif"]
    assert tifffile.imread(path).shape == (17, 19)


def test_failed_write_leaves_neither_temporary_nor_final_file(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever tifffile raises, nothing may be left behind
        write_tiff(tmp_path / "bad.tif", np.array([object()] * 4))
    assert list(tmp_path.iterdir()) == []


def test_normalization_of_a_read_only_float32_view_copies_it():
    # float32 planes of a NIfTI file are read-only views: normalising must neither fail nor write into them.
    stored = np.linspace(0, 100, 60, dtype=np.float32).reshape(1, 6, 10)
    view = stored[:, 1:5]
    view.flags.writeable = False
    out = Normalization(0.0, 100.0).apply(view, (0.0, 100.0))
    assert out.dtype == np.float32 and out.flags.writeable and not np.shares_memory(out, stored)
    np.testing.assert_allclose(out, view / 100.0, rtol=1e-6)
    assert stored.max() == 100.0
