"""Volumes: 3-D TIFF (ZYX, ZCYX) and NIfTI files opened lazily in (Z, Y, X[, C]) order, their voxel
spacing, a lazy (C, Z, Y, X) channel view, and whole-volume percentile ranges.

Spacing is always (Z, Y, X) in the file's unit: from NIfTI pixdim, or from a TIFF's resolution
tags (Y, X) and ImageJ `spacing` or OME `PhysicalSizeZ` (Z). A missing value is None, never a
guess, so the caller decides (e.g. isotropic voxels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unetseg.io.files import TIFF_SUFFIXES, image_suffix
from unetseg.io.images import read_image, to_channels
from unetseg.io.nifti import is_nifti, open_nifti
from unetseg.io.normalize import Normalization, count_non_finite, value_range, warn_non_finite
from unetseg.io.registry import container, open_source
from unetseg.io.source import DEFAULT_MAX_PIXELS, ImageReadError, InputImage, native, spacing_calibration
from unetseg.io.tiff import release_pages

__all__ = [
    "VolumeChannels",
    "is_volume_file",
    "open_volume",
    "read_mask",
    "read_volume",
    "read_volume_labels",
    "spacing_calibration",
    "volume_range",
    "volume_to_channels",
]


def is_volume_file(path: str | Path) -> bool:
    """True for a file that may hold a volume: NIfTI or TIFF (a TIFF may also be a 2-D image)."""
    return is_nifti(path) or image_suffix(Path(path)) in TIFF_SUFFIXES


def open_volume(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputImage:
    """Open a volume through the registry (`unetseg.io.registry.open_source`): a NIfTI file, a TIFF read as
    a Z stack (ZYX, ZCYX/ZYXC through its ImageJ or OME axes), or an OME-Zarr image (its z axis and scale).

    A 2-D TIFF opens as a volume of one plane. Volumes whose header claims more than `max_pixels`
    voxels are refused unread (None: no cap). Raises ImageReadError naming the file otherwise.
    """
    path = Path(path)
    if container(path) == "image" and image_suffix(path) not in TIFF_SUFFIXES:
        raise ImageReadError(f"{path}: a volume must be a TIFF stack, NIfTI (.nii, .nii.gz) or an OME-Zarr image")
    image = open_source(path, max_pixels)
    image.stack = True
    return image


def read_volume(path: str | Path) -> InputImage:
    """`open_volume` with the voxels read into memory in native byte order (training data)."""
    volume = open_volume(path)
    volume.planes = np.ascontiguousarray(native(volume.planes[:]))
    return volume


def read_volume_labels(path: str | Path) -> np.ndarray:
    """A volume mask as (Z, Y, X) integers (int32 where they fit): binary, instance labels or class indices,
    from a TIFF stack or NIfTI."""
    path = Path(path)
    return _volume_labels(
        np.asarray(read_image(path) if not is_nifti(path) else native(open_nifti(path).voxels[:])), path
    )


def _volume_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """A read volume mask checked, (Z, Y, X), its labels kept exact (int32 where they fit)."""
    from unetseg.io.images import _exact_labels

    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ImageReadError(f"{path}: a volume mask must be (Z, Y, X); this one has shape {mask.shape}")
    return _exact_labels(mask, path)


def volume_to_channels(voxels: np.ndarray, in_channels: int, path: str | Path = "volume") -> np.ndarray:
    """(Z, Y, X[, C]) -> (in_channels, Z, Y, X), converting channels as `to_channels` does for an image."""
    depth, height, width = voxels.shape[:3]
    flat = voxels.reshape((depth * height, width) + voxels.shape[3:])  # planes stacked: conversion is per voxel
    return to_channels(flat, in_channels, path).reshape(in_channels, depth, height, width)


class VolumeChannels:
    """A lazy (in_channels, Z, Y, X) view of (Z, Y, X[, C]) voxels: `view[:, z0:z1]` reads and converts only
    those planes (how the tiled engine reads a volume, slab by slab), releasing memory-mapped pages."""

    def __init__(self, voxels: Any, in_channels: int, path: str | Path = "volume"):
        self.voxels, self.in_channels, self.path = voxels, in_channels, path
        self.shape = (in_channels, *(int(n) for n in voxels.shape[:3]))

    def __getitem__(self, key) -> np.ndarray:
        channels, planes = key
        if channels != slice(None) or not isinstance(planes, slice):
            raise IndexError("VolumeChannels supports only view[:, start:stop]")
        start, stop, _ = planes.indices(self.shape[1])
        slab = volume_to_channels(native(self.voxels[start:stop]), self.in_channels, self.path)
        release_pages(self.voxels)
        return slab

    def iter_bands(self):
        """(first row, band (C, Y, X)) per plane, rows counted over the planes stacked, for `value_range`."""
        height = self.shape[2]
        for z in range(self.shape[1]):
            yield z * height, self[:, z : z + 1][:, 0]


def volume_range(voxels: Any, in_channels: int, normalization: Normalization, path: str | Path = "volume"):
    """The (low, high) percentile values of a whole volume (all channels), read plane by plane; one warning
    naming `path` when it holds NaN or infinite values (`warn_non_finite`).

    The one percentile rule (`value_range`) over the planes stacked as rows, so training and
    prediction of a volume get the same range whatever holds the voxels.
    """
    view = VolumeChannels(voxels, in_channels, path)
    channels, depth, height, width = view.shape
    non_finite = [0]

    def counted(bands):
        for start, band in bands:
            non_finite[0] += count_non_finite(band)
            yield start, band

    shape = (channels, depth * height, width)
    result = value_range(counted(view.iter_bands()), shape, normalization.low, normalization.high)
    warn_non_finite(path, non_finite[0], channels * depth * height * width)  # the warning of 2-D images, once
    return result


def read_mask(path: str | Path) -> np.ndarray:
    """A mask of an image (H, W) or of a volume (Z, Y, X), integer labels kept exact: what `unetseg-evaluate`
    scores. NIfTI files are volumes; anything else is read by `read_labels` (TIFF stacks included)."""
    from unetseg.io.images import read_labels

    path = Path(path)
    return read_volume_labels(path) if is_nifti(path) else read_labels(path, stack=True)
