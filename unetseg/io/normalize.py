"""Percentile normalisation of whole images, computed band by band, and a lazy channel view of a plane.

The one percentile rule of unetseg lives here: training (`Normalization.range`) and prediction
(`plane_range`) both call `value_range`, so a checkpoint's normalisation is repeated exactly.
Hand-written, not `np.percentile`: a histogram gathered band by band gives exact percentiles of
8/16-bit images that never fit in memory, where numpy needs the whole array.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.io.images import to_channels
from unetseg.io.source import native
from unetseg.io.tiff import release_pages

log = logging.getLogger(__name__)

# Float (and wide integer) images with more values than this are subsampled by whole rows, to
# about PERCENTILE_SAMPLES values; 8/16-bit images always use an exact histogram.
PERCENTILE_SAMPLE_ABOVE, PERCENTILE_SAMPLES = 16_000_000, 4_000_000


@dataclass(frozen=True)
class Normalization:
    """Percentile normalisation over a whole image: (x - p_low) / (p_high - p_low), float32.

    The percentiles are taken once per image (all channels together, as CSBDeep/StarDist do),
    so a 16-bit image is never squashed tile by tile. Non-finite pixels (NaN, +-Inf) are left
    out of the percentiles; after scaling, NaN and -Inf become 0 (the low percentile) and +Inf
    becomes 1 (the high one).
    """

    low: float = 1.0
    high: float = 99.8
    clip: bool = True  # to [0, 1]: intensity augmentations (gamma) need non-negative values

    def __post_init__(self):
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(
                f"normalization percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}"
            )

    def range(self, image: np.ndarray) -> tuple[float, float]:
        """The (low, high) intensity values of the percentiles of a whole image, (C, H, W) or any shape."""
        image = np.asarray(image)
        if image.ndim != 3:
            image = image.reshape(1, -1, image.shape[-1] if image.ndim else 1)
        return value_range([(0, image)], image.shape, self.low, self.high)

    def apply(self, image: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """Scale with a range from `range()`; float32 out, clipped to [0, 1] when `clip`."""
        low, high = value_range
        scale = np.float32(1.0 / max(high - low, 1e-6))
        out = np.array(image, dtype=np.float32)  # always a copy: float32 input may be a read-only view of a file
        out -= np.float32(low)
        out *= scale
        if np.asarray(image).dtype.kind == "f":
            np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.apply(image, self.range(image))

    def to_dict(self) -> dict:
        return asdict(self)


def value_range(
    bands: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int, int], low: float, high: float
) -> tuple[float, float]:
    """Percentiles `low` and `high` of an image (C, H, W) given as (first row, band (C, rows, W)) pairs.

    The rule is numpy's `method="lower"` (the smallest value whose rank reaches q), exactly,
    by histogram for 8/16-bit images; other types use the finite values of every k-th row when
    the image holds more than PERCENTILE_SAMPLE_ABOVE values. The rows sampled depend only on
    the image's shape, so any banding gives the same answer. Only one band is held at a time.
    (0, 1) when no value is finite.
    """
    bands = iter(bands)
    first = next(bands)
    dtype = first[1].dtype
    bands = itertools.chain([first], bands)
    del first
    if dtype in (np.uint8, np.uint16):
        counts = np.zeros(np.iinfo(dtype).max + 1, dtype=np.int64)
        for _, band in bands:
            flat = band.reshape(-1)
            for start in range(0, flat.size, 1 << 22):  # bincount converts to int64: 8 bytes a value
                counts += np.bincount(flat[start : start + (1 << 22)], minlength=counts.size)
        return histogram_percentiles(counts, low, high)
    size = int(np.prod(shape))
    row_step = size // PERCENTILE_SAMPLES if size > PERCENTILE_SAMPLE_ABOVE else 1
    samples = []
    for start, band in bands:
        rows = band[:, (-start) % row_step :: row_step]
        values = rows.reshape(-1)
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]
        samples.append(np.array(values, copy=True))  # not a view: frees the band
    values = np.concatenate(samples)
    if values.size == 0:
        return 0.0, 1.0
    return tuple(float(v) for v in np.percentile(values, [low, high], method="lower"))


def histogram_percentiles(counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Percentiles from a histogram of integer values (counts[v] = pixels of value v), exactly as
    np.percentile(method="lower"): the smallest value whose rank reaches q."""
    cumulative = np.cumsum(counts, dtype=np.float64)
    total = cumulative[-1]
    values = [int(np.searchsorted(cumulative, np.floor(q / 100.0 * (total - 1)) + 1)) for q in (low, high)]
    return float(values[0]), float(values[1])


class ChannelBands:
    """A lazy (in_channels, H, W) view of one plane (H, W[, C]): rows are read and converted by `to_channels`
    only when sliced as `view[:, start:stop]`, which is how the tiled engine reads its input."""

    def __init__(self, plane: Any, in_channels: int, path: str | Path = "image"):
        self.plane, self.in_channels, self.path = plane, in_channels, path
        self.shape = (in_channels, int(plane.shape[0]), int(plane.shape[1]))

    def __getitem__(self, key) -> np.ndarray:
        channels, rows = key
        if channels != slice(None) or not isinstance(rows, slice):
            raise IndexError("ChannelBands supports only view[:, start:stop]")
        start, stop, _ = rows.indices(self.shape[1])
        return read_band(self.plane, start, stop - start, self.in_channels, self.path)

    def iter_bands(self, chunk_pixels: int = 1 << 22):
        """(first row, band) pairs covering the plane, about `chunk_pixels` values at a time."""
        rows = max(1, chunk_pixels // (self.shape[2] * self.in_channels))
        for start in range(0, self.shape[1], rows):
            yield start, self[:, start : start + rows]


def read_band(plane: Any, start: int, rows: int, in_channels: int, path: str | Path) -> np.ndarray:
    """Rows start to start + rows of a plane as (in_channels, rows, W), memory-mapped pages released."""
    band = to_channels(native(plane[start : start + rows]), in_channels, path)
    release_pages(plane)
    return band


def plane_range(
    plane: Any, in_channels: int, normalization: Normalization, path: str | Path = "image", chunk_pixels: int = 1 << 22
) -> tuple[float, float]:
    """`normalization.range(to_channels(plane, in_channels))`, the range training used, taken band by band.

    Warns once, naming `path`, when the plane holds NaN or infinite values (see `warn_non_finite`).
    """
    bands = ChannelBands(plane, in_channels, path)
    non_finite = [0]

    def counted(pairs: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        for start, band in pairs:
            non_finite[0] += count_non_finite(band)
            yield start, band

    result = value_range(counted(bands.iter_bands(chunk_pixels)), bands.shape, normalization.low, normalization.high)
    warn_non_finite(path, non_finite[0], int(np.prod(bands.shape)))
    return result


def count_non_finite(array: np.ndarray) -> int:
    """Number of NaN and infinite values of an array (0 for integer types)."""
    array = np.asarray(array)
    return int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0


def warn_non_finite(path: str | Path, count: int, size: int) -> None:
    """One warning line naming the file when it holds non-finite values, and what they become."""
    if count:
        log.warning(
            "%s: %d of %d values are NaN or infinite; they are left out of the normalisation percentiles, "
            "and NaN and -Inf read as the low percentile (0), +Inf as the high one (1)",
            path,
            count,
            size,
        )
