"""Which reader opens an input: one table from container to opener, so no code outside `io/` checks suffixes.

Every opener returns the one `InputImage` (lazy (Z, Y, X[, C]) planes, calibration, voxel
size, format metadata): a 2-D image is a stack of one plane. A 2-D model predicts its planes one
by one and a 3-D model the planes as one volume, whatever the container.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from unetseg.io.files import ZARR_SUFFIXES, image_suffix
from unetseg.io.source import DEFAULT_MAX_PIXELS, ImageReadError, InputImage, check_pixels, spacing_calibration

__all__ = ["CONTAINERS", "NIFTI_SUFFIXES", "PNG_SUFFIXES", "container", "open_source", "output_container"]

# Input containers; "image" takes every other file (TIFF and TIFF stacks, PNG, JPEG, BMP).
CONTAINERS = ("nifti", "ome-zarr", "image")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)


def container(path: str | Path) -> str:
    """The container of an input: "nifti" (.nii, .nii.gz), "ome-zarr" (a *.zarr folder) or "image"."""
    path = Path(path)
    if image_suffix(path) in NIFTI_SUFFIXES:
        return "nifti"
    if path.suffix.lower() in ZARR_SUFFIXES:
        return "ome-zarr"
    return "image"


def output_container(target: str | Path) -> str:
    """The container an output is written as: "nifti", "ome-zarr" (x.ome.zarr, or IMAGE.zarr/labels/NAME),
    "png" or "tiff" (anything else)."""
    target = Path(target)
    if image_suffix(target) in NIFTI_SUFFIXES:
        return "nifti"
    if ZARR_SUFFIXES[0] in (target.suffix.lower(), target.parent.parent.suffix.lower()):
        return "ome-zarr"
    return "png" if target.suffix.lower() in PNG_SUFFIXES else "tiff"


def _open_nifti(path: Path, max_pixels: int | None) -> InputImage:
    from unetseg.io.nifti import open_nifti  # nibabel: imported only for NIfTI inputs

    nifti = open_nifti(path)
    check_pixels(path, nifti.voxels.shape, 1, max_pixels)
    calibration = spacing_calibration(nifti.spacing, nifti.unit)
    return InputImage(nifti.voxels, True, calibration=calibration, stated_spacing=nifti.spacing, nifti=nifti)


def _open_zarr(path: Path, max_pixels: int | None) -> InputImage:
    from unetseg.io.zarr import open_zarr  # zarr: imported only for OME-Zarr inputs

    return open_zarr(path, max_pixels)


def _open_image(path: Path, max_pixels: int | None) -> InputImage:
    from unetseg.io.tiff import open_image

    return open_image(path, max_pixels)


OPENERS: dict[str, Callable[[Path, int | None], InputImage]] = {
    "nifti": _open_nifti,
    "ome-zarr": _open_zarr,
    "image": _open_image,
}


def open_source(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputImage:
    """Open any input lazily: a NIfTI volume, an OME-Zarr image or an image file (TIFF and TIFF stacks,
    PNG, JPEG, BMP). Inputs claiming more than `max_pixels` pixels are refused unread (None: no cap).
    Raises ImageReadError naming the file for anything else."""
    path = Path(path)
    kind = container(path)
    if kind == "ome-zarr" and not path.is_dir():
        raise ImageReadError(f"{path}: no such OME-Zarr folder")
    return OPENERS[kind](path, max_pixels)
