import numpy as np
import pytest

from unetseg.inference.tiling import (
    BLENDS,
    GAUSSIAN_MIN_WEIGHT,
    PAD_MODES,
    axis_weights,
    center_owner,
    check_tiling,
    gaussian_window,
    pad_indices,
    padding,
    tile_starts,
)


def covered_sum(padded_length, starts, weights):
    """Sum of every tile's weights at each padded position."""
    total = np.zeros(padded_length)
    for start, tile_weights in zip(starts, weights):
        total[start : start + len(tile_weights)] += tile_weights
    return total


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("length", [1, 2, 3, 7])
@pytest.mark.parametrize("before, after", [(0, 0), (2, 5), (9, 30)])
def test_pad_indices_match_numpy_pad_even_when_wider_than_the_axis(pad_mode, length, before, after):
    values = np.arange(10, 10 + length)
    expected = np.pad(values, (before, after), mode=pad_mode)
    np.testing.assert_array_equal(values[pad_indices(length, before, after, pad_mode)], expected)


def test_pad_indices_refuses_unknown_mode_and_empty_axis():
    with pytest.raises(ValueError, match="pad_mode must be one of reflect, symmetric, edge; got 'wrap'"):
        pad_indices(5, 1, 1, "wrap")
    with pytest.raises(ValueError, match="empty axis"):
        pad_indices(0, 1, 1)


@pytest.mark.parametrize("length", [1, 10, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("tile_size, overlap", [(32, 0), (32, 8), (32, 31), (64, 7)])
def test_tile_starts_cover_the_padded_axis_with_at_least_the_overlap(length, tile_size, overlap):
    before, after = padding(length, tile_size)
    assert before + after == max(0, tile_size - length) and 0 <= after - before <= 1  # only short axes, evenly
    padded_length = before + length + after
    assert padded_length >= tile_size
    starts = tile_starts(padded_length, tile_size, overlap)
    assert starts[0] == 0 and starts[-1] == padded_length - tile_size
    steps = np.diff(starts)
    assert np.all(steps > 0) and np.all(steps <= tile_size - overlap)
    # The fewest tiles: n tiles sharing at least `overlap` span at most tile_size + (n - 1) (tile_size - overlap).
    assert tile_size + (len(starts) - 2) * (tile_size - overlap) < padded_length or len(starts) == 1


def test_grid_of_a_1024_image_has_as_few_tiles_as_monai():
    before, after = padding(1024, 256)
    assert (before, after) == (0, 0)  # no mirrored context: 5 x 5 tiles, not 6 x 6
    np.testing.assert_array_equal(tile_starts(1024, 256, 64), [0, 192, 384, 576, 768])
    assert padding(200, 256) == (28, 28)


def test_tile_starts_step_is_tile_minus_overlap_and_last_tile_is_moved_back():
    np.testing.assert_array_equal(tile_starts(100, 32, 8), [0, 24, 48, 68])
    np.testing.assert_array_equal(tile_starts(32, 32, 8), [0])
    np.testing.assert_array_equal(tile_starts(80, 32, 8), [0, 24, 48])
    with pytest.raises(ValueError, match="padded_length"):
        tile_starts(31, 32, 8)


def test_gaussian_window_is_symmetric_with_sigma_an_eighth_of_the_tile():
    window = gaussian_window(64)
    np.testing.assert_allclose(window, window[::-1])
    assert window.max() == pytest.approx(np.exp(-(0.5**2) / (2 * 8.0**2)))
    assert window.min() == GAUSSIAN_MIN_WEIGHT  # the far edge is clamped, not zero
    distance = 31.5 - 8.0  # a pixel one sigma from the centre
    assert window[8] == pytest.approx(np.exp(-(distance**2) / (2 * 8.0**2)))


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("length", [5, 70, 301])
def test_axis_weights_sum_to_one_at_every_position(blend, length):
    before, after = padding(length, 32)
    padded_length = before + length + after
    starts = tile_starts(padded_length, 32, 10)
    weights = axis_weights(padded_length, starts, 32, blend)
    assert weights.shape == (len(starts), 32) and weights.dtype == np.float32
    np.testing.assert_allclose(covered_sum(padded_length, starts, weights), 1.0, atol=1e-6)


def test_mean_weights_are_one_over_the_tile_count():
    starts = tile_starts(56, 32, 8)  # [0, 24]: positions 24..31 in both tiles
    weights = axis_weights(56, starts, 32, "mean")
    np.testing.assert_array_equal(weights[0, :24], 1.0)
    np.testing.assert_array_equal(weights[0, 24:], 0.5)


@pytest.mark.parametrize("tile_size, overlap", [(32, 6), (32, 7), (32, 8), (16, 15), (64, 0)])
@pytest.mark.parametrize("length", [3, 50, 123])
def test_center_weights_give_each_position_to_one_tile_with_half_the_overlap_of_context(tile_size, overlap, length):
    before, after = padding(length, tile_size)
    padded_length = before + length + after
    starts = tile_starts(padded_length, tile_size, overlap)
    weights = axis_weights(padded_length, starts, tile_size, "center")
    assert set(np.unique(weights)) <= {0.0, 1.0}
    np.testing.assert_array_equal(covered_sum(padded_length, starts, weights), 1.0)
    owner = center_owner(padded_length, starts, tile_size)
    image_positions = np.arange(before, before + length)
    first = starts[owner[image_positions]]
    left = image_positions - first
    right = first + tile_size - 1 - image_positions
    # Half the overlap of context on both sides, except where the owner tile ends at the border, as the image does.
    assert np.all((left >= overlap // 2) | (first == 0))
    assert np.all((right >= overlap // 2) | (first + tile_size == padded_length))


def test_center_owner_splits_the_overlap_in_the_middle():
    owner = center_owner(56, np.array([0, 24]), 32)
    np.testing.assert_array_equal(owner, [0] * 28 + [1] * 28)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 0, "overlap": 0}, "tile_size must be a positive integer"),
        ({"tile_size": 32.0, "overlap": 0}, "tile_size must be a positive integer"),
        ({"tile_size": 32, "overlap": 32}, r"overlap must be an integer with 0 <= overlap < tile_size \(32\), got 32"),
        ({"tile_size": 32, "overlap": -1}, "overlap must be"),
        ({"tile_size": 32, "overlap": 8, "blend": "max"}, "blend must be one of gaussian, mean, center; got 'max'"),
        ({"tile_size": 32, "overlap": 8, "pad_mode": "zeros"}, "pad_mode must be one of reflect, symmetric, edge"),
    ],
)
def test_check_tiling_names_the_option_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_tiling(**kwargs)
