"""Training samples of any number of spatial axes: one image (C, H, W) or volume (C, Z, Y, X) with its labels,
and the windows (tiles, patches) cut from it: grids for validation, random windows with foreground
oversampling for training, reflect padding for samples smaller than a window.

The 2-D tile datasets (`unetseg.training.data`) and the 3-D patch datasets
(`unetseg.training.volumes`) differ only in their readers (both augment with
`unetseg.training.augment.build_transform`); the geometry is here, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Sample", "foreground_coordinates", "pad_sample", "random_window", "window_grid"]


@dataclass
class Sample:
    """One image (C, H, W) or volume (C, Z, Y, X) in its stored dtype, its labels (H, W) / (Z, Y, X), and its
    percentile range."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    value_range: tuple[float, float]
    foreground: np.ndarray  # (K, ndim) coordinates of foreground pixels (voxels), subsampled
    stored_channels: int = 0  # channels of the file (alpha dropped), before conversion to in_channels
    spacing: tuple = (None, None, None)  # a volume's voxel size (Z, Y, X); None where the file does not say


def foreground_coordinates(labels: np.ndarray, limit: int = 4096) -> np.ndarray:
    """(K, ndim) coordinates of foreground pixels (voxels), evenly subsampled to at most `limit`."""
    coordinates = np.argwhere(labels > 0)
    return coordinates[:: max(1, -(-len(coordinates) // limit))]


def pad_sample(sample: Sample, size: int | Sequence[int]) -> Sample:
    """Reflect-pad a sample smaller than a window (`size`: one int for every axis, or one per axis) along any
    axis, so random windows always fit; numpy repeats the reflection for large pads."""
    shape = sample.labels.shape
    sizes = (size,) * len(shape) if isinstance(size, (int, np.integer)) else tuple(size)
    pads = [max(0, want - length) for want, length in zip(sizes, shape)]
    if not any(pads):
        return sample
    spec = tuple((pad // 2, pad - pad // 2) for pad in pads)
    labels = np.pad(sample.labels, spec, mode="reflect")
    image = np.pad(sample.image, ((0, 0), *spec), mode="reflect")
    return dataclasses.replace(sample, image=image, labels=labels, foreground=foreground_coordinates(labels))


def window_grid(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, ...]]:
    """Corners of windows of `size` covering an array of `shape`, the last ones along each axis shifted inside;
    an axis shorter than a window gives one shorter window, so validation never scores padding."""
    axes = [
        sorted({min(start, max(length - want, 0)) for start in range(0, length, want)})
        for length, want in zip(shape, size)
    ]
    return [
        tuple(int(n) for n in corner) for corner in np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T
    ]


def random_window(
    sample: Sample, size: Sequence[int], rng: np.random.Generator, foreground_oversampling: float
) -> tuple[int, ...]:
    """The corner of a random window of `size` in `sample`: centred on a random foreground pixel (voxel) with
    probability `foreground_oversampling` (nnU-Net samples a third this way), else anywhere."""
    shape = sample.labels.shape
    if len(sample.foreground) and rng.random() < foreground_oversampling:
        centre = sample.foreground[rng.integers(len(sample.foreground))]
        return tuple(int(np.clip(c - want // 2, 0, length - want)) for c, want, length in zip(centre, size, shape))
    return tuple(int(rng.integers(length - want + 1)) for want, length in zip(size, shape))
