"""Property-based tests (hypothesis): tiling geometry for any sizes, and readers for any image or broken file."""

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage import io as skio

from unetseg.inference.tiling import BLENDS, PAD_MODES, axis_weights, pad_indices, padding, tile_starts
from unetseg.io import ImageReadError, Normalization, open_image, read_image, read_labels
from unetseg.io.normalize import plane_range

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def axes(draw):
    """(length, tile_size, overlap) of one axis: any length, from a single pixel to several tiles."""
    tile_size = draw(st.integers(2, 96))
    overlap = draw(st.integers(0, tile_size - 1))
    length = draw(st.integers(1, 5 * tile_size))
    return length, tile_size, overlap


@FAST
@given(axes())
def test_tiles_start_inside_the_padded_axis_and_cover_all_of_it(axis):
    length, tile_size, overlap = axis
    before, after = padding(length, tile_size)
    padded = before + length + after
    assert padded == max(length, tile_size) and before == max(0, tile_size - length) // 2  # padded only if short
    starts = tile_starts(padded, tile_size, overlap)
    assert starts[0] == 0 and starts[-1] == padded - tile_size
    assert np.all((starts >= 0) & (starts + tile_size <= padded))
    assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= tile_size - overlap)
    covered = np.zeros(padded, int)
    for start in starts:
        covered[start : start + tile_size] += 1
    assert covered.min() >= 1


@FAST
@given(axes(), st.sampled_from(BLENDS))
def test_blend_weights_sum_to_one_at_every_position(axis, blend):
    length, tile_size, overlap = axis
    before, after = padding(length, tile_size)
    padded = before + length + after
    starts = tile_starts(padded, tile_size, overlap)
    weights = axis_weights(padded, starts, tile_size, blend)
    assert weights.shape == (len(starts), tile_size) and weights.min() >= 0
    total = np.zeros(padded)
    np.add.at(total, starts[:, None] + np.arange(tile_size)[None, :], weights)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@FAST
@given(st.integers(1, 40), st.integers(0, 90), st.integers(0, 90), st.sampled_from(PAD_MODES))
def test_pad_indices_stay_inside_the_axis_and_equal_numpy_pad(length, before, after, pad_mode):
    index = pad_indices(length, before, after, pad_mode)
    assert index.min() >= 0 and index.max() < length
    np.testing.assert_array_equal(index, np.pad(np.arange(length), (before, after), mode=pad_mode))


# --- Readers -------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.uint32, np.float32])
SHAPES = st.one_of(
    st.tuples(st.integers(1, 24), st.integers(1, 24)), st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))
)


@FAST
@given(st.data())
def test_tiff_images_read_back_exactly(tmp_path, data):
    dtype = data.draw(DTYPES)
    image = data.draw(arrays(dtype, data.draw(SHAPES)))
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack")
    read = read_image(path)
    np.testing.assert_array_equal(read, image)
    assert read.dtype == image.dtype
    np.testing.assert_array_equal(np.asarray(open_image(path).planes[0]), image)


@FAST
@given(st.data())
def test_png_images_read_back_exactly(tmp_path, data):
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16]))
    shape = data.draw(SHAPES)
    image = data.draw(arrays(dtype, shape[:2] if dtype == np.uint16 else shape))  # Pillow writes 16-bit grey only
    path = tmp_path / "x.png"
    skio.imsave(path, image, check_contrast=False)
    np.testing.assert_array_equal(read_image(path), image)


@FAST
@given(st.data())
def test_label_values_are_kept_exactly(tmp_path, data):
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64, np.int32]))
    elements = st.integers(0, int(np.iinfo(dtype).max))
    labels = data.draw(arrays(dtype, data.draw(st.tuples(st.integers(1, 16), st.integers(1, 16))), elements=elements))
    tifffile.imwrite(tmp_path / "m.tif", labels)
    read = read_labels(tmp_path / "m.tif")
    assert read.dtype.kind in "iu"
    np.testing.assert_array_equal(read.astype(object), labels.astype(object))


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """Valid files of each reader, as bytes: TIFF (plain, deflate, ImageJ stack), PNG, BMP."""
    folder = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "plain.tif", rng.integers(0, 60000, (20, 30), dtype=np.uint16))
    tifffile.imwrite(folder / "deflate.tif", rng.random((20, 30, 3), dtype=np.float32), compression="zlib")
    stack = rng.integers(0, 255, (3, 16, 16), dtype=np.uint8)
    tifffile.imwrite(folder / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    skio.imsave(folder / "x.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), check_contrast=False)
    skio.imsave(folder / "x.bmp", rng.integers(0, 255, (20, 30), dtype=np.uint8), check_contrast=False)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@FAST
@given(st.data())
def test_damaged_files_are_read_or_refused_by_name_never_crash(tmp_path, valid_files, data):
    name = data.draw(st.sampled_from(sorted(valid_files)))
    content = bytearray(valid_files[name])
    damage = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if damage == "truncate":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    elif damage == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    else:
        content = bytearray(data.draw(st.binary(min_size=1, max_size=300)))
    path = tmp_path / name
    path.write_bytes(bytes(content))
    for reader in (read_image, open_image, read_labels):
        try:
            reader(path)
        except ImageReadError as error:
            assert str(error).startswith(str(path))


@FAST
@given(st.data())
def test_normalised_images_are_finite_in_unit_range_whatever_the_values(data):
    values = st.floats(allow_nan=True, allow_infinity=True, width=32)
    image = data.draw(arrays(np.float32, data.draw(st.tuples(st.integers(1, 20), st.integers(1, 20))), elements=values))
    normalization = Normalization()
    out = normalization(image)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    chunk = data.draw(st.integers(1, 400))
    assert plane_range(image, 1, normalization, chunk_pixels=chunk) == normalization.range(image[None])
