"""The format-neutral core of inputs: the opened image (`InputImage`), its pixel size (`Calibration`), the
axis letters, and the error and pixel limit every reader shares. Readers (`tiff`, `nifti`, `zarr`, `images`)
import it; it imports none of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Pixels (height x width x planes, channels not counted) an image may claim before it is refused
# unread: a 30000 x 30000 RGB image passes, a 50000 x 50000 decompression bomb does not.
DEFAULT_MAX_PIXELS = 1_000_000_000


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the reason."""


def check_pixels(path: Path, shape: tuple, channels: int, max_pixels: int | None) -> None:
    """Refuse an image whose header claims more than `max_pixels` pixels (shape without its `channels` axis)."""
    pixels = math.prod(int(side) for side in shape) // max(1, channels)
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(
            f"{path}: claims {'x'.join(map(str, shape))} = {pixels:,} pixels, more than the limit of "
            f"{max_pixels:,} (--max-pixels); refused before decoding"
        )


# A compressed file whose pixels take more than BOMB_FROM_BYTES and BOMB_RATIO times its size is refused:
# deflate and LZW pack even an all-zero image at most ~1,000 times.
BOMB_FROM_BYTES, BOMB_RATIO = 64 << 20, 10_000


def check_compression(path: Path, shape: tuple, dtype: Any, contiguous: bool) -> None:
    """Refuse a compressed (or scattered) image whose pixels would take far more bytes than the whole file:
    a small file claiming a huge image decodes strips of gigabytes before it fails. `contiguous`: stored
    uncompressed in one block (checked against the file size when it is mapped instead)."""
    declared, size = math.prod(int(side) for side in shape) * np.dtype(dtype).itemsize, Path(path).stat().st_size
    if not contiguous and declared > BOMB_FROM_BYTES and declared > BOMB_RATIO * size:
        raise ImageReadError(
            f"{path}: declares {declared:,} bytes of pixels in a file of {size:,} bytes ({declared / size:,.0f} "
            "times more; compression rarely passes 1,000): refused as a decompression bomb"
        )


IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # what an ImageJ hyperstack can hold
CHANNEL_AXES, PLANE_AXES = "SC", "ZTQI"  # tifffile axis letters: samples/channels; slices/frames/pages


@dataclass(frozen=True)
class Calibration:
    """The physical pixel size of an image, as its TIFF tags and ImageJ or OME metadata give it."""

    resolution: tuple | None = None  # (XResolution, YResolution): pixels per unit, TIFF rationals or floats
    resolution_unit: int | None = None  # TIFF ResolutionUnit: 1 none (see `unit`), 2 inch, 3 centimetre
    unit: str | None = None  # ImageJ unit name ("micron", "nm"...) when resolution_unit is 1
    spacing: float | None = None  # distance between the planes of a stack, in `unit`

    def tiff_kwargs(self, axes: str, dtype: np.dtype) -> dict:
        """`tifffile.imwrite` arguments writing this calibration: ImageJ metadata, OME where ImageJ can't (uint32)."""
        kwargs: dict[str, Any] = {"photometric": "minisblack"}  # never let a width of 3 or 4 pass for RGB
        if self.resolution is not None:
            kwargs["resolution"] = self.resolution
        if self.resolution_unit is not None:
            kwargs["resolutionunit"] = self.resolution_unit
        if np.dtype(dtype) in IMAGEJ_DTYPES:
            metadata = {"axes": axes, "unit": self.unit, "spacing": self.spacing}
            kwargs["imagej"] = True
        else:
            metadata = {"axes": axes, **self._ome_sizes()}
            kwargs["ome"] = True
        kwargs["metadata"] = {key: value for key, value in metadata.items() if value is not None}
        return kwargs

    def _ome_sizes(self) -> dict:
        """OME PhysicalSizeX/Y/Z and units, where the unit has an OME name."""
        unit = {2: "in", 3: "cm"}.get(self.resolution_unit) or OME_UNITS.get(self.unit or "")
        if self.resolution is None or unit is None:
            return {}
        x, y = (_ratio(value) for value in self.resolution)
        sizes = {"PhysicalSizeX": 1 / x, "PhysicalSizeXUnit": unit, "PhysicalSizeY": 1 / y, "PhysicalSizeYUnit": unit}
        if self.spacing is not None:
            sizes |= {"PhysicalSizeZ": self.spacing, "PhysicalSizeZUnit": unit}
        return sizes


OME_UNITS = {"micron": "µm", "um": "µm", "µm": "µm", "\\u00B5m": "µm", "nm": "nm", "mm": "mm", "cm": "cm"}
IMAGEJ_UNITS = {"µm": "micron", "nm": "nm", "mm": "mm", "cm": "cm", "m": "m", "Å": "angstrom"}


def _ratio(value) -> float:
    """A TIFF rational (numerator, denominator) or a number, as a float."""
    return value[0] / value[1] if isinstance(value, tuple) else float(value)


Spacing = tuple[float | None, float | None, float | None]  # (Z, Y, X); None where the file does not say


@dataclass
class InputImage:
    """An image, stack or volume opened for prediction or training: one object whatever the container.

    planes: (Z, H, W) or (Z, H, W, C) in the stored dtype, Z = 1 for a 2D image; read lazily (a
        read-only memory map of an uncompressed TIFF, a chunked OME-Zarr array, a NIfTI proxy).
    stack: True for a Z (or T) stack or a volume: its outputs keep the Z axis.
    calibration: the pixel size written with TIFF and OME-Zarr outputs (Z spacing included).
    stated_spacing: the voxel size (Z, Y, X) in the calibration's unit where the file states it
        exactly (NIfTI pixdim); None: derived from the calibration (`spacing`).
    nifti: the NIfTI input whose affine and header NIfTI outputs keep; None for other inputs.

    A 2-D model predicts every plane by itself; a 3-D model predicts the planes as one volume.
    """

    planes: Any
    stack: bool = False
    plane_axis: str = "Z"
    calibration: Calibration = field(default_factory=Calibration)
    stated_spacing: Spacing | None = None
    nifti: Any = None

    @property
    def height(self) -> int:
        return int(self.planes.shape[1])

    @property
    def width(self) -> int:
        return int(self.planes.shape[2])

    @property
    def voxels(self) -> Any:
        """The planes, as a volume (Z, Y, X[, C])."""
        return self.planes

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(int(n) for n in self.planes.shape[:3])

    @property
    def unit(self) -> str | None:
        return self.calibration.unit

    @property
    def spacing(self) -> Spacing:
        """(Z, Y, X) voxel size in `unit`; None where the file does not say."""
        return self.stated_spacing if self.stated_spacing is not None else tiff_spacing(self.calibration)


def tiff_spacing(calibration: Calibration) -> Spacing:
    """(Z, Y, X) voxel size of a calibration, in its unit; None where the TIFF does not say."""
    y = x = None
    if calibration.resolution is not None:
        x, y = (1.0 / _ratio(value) if _ratio(value) else None for value in calibration.resolution)
    return calibration.spacing, y, x


def spacing_calibration(spacing: Spacing, unit: str | None = "micron") -> Calibration:
    """The TIFF calibration of a voxel spacing (Z, Y, X): resolution in pixels per unit, ImageJ spacing.

    Used to write TIFF outputs of NIfTI inputs, and synthetic volumes, with their voxel size.
    """
    z, y, x = spacing
    resolution = (1.0 / x, 1.0 / y) if x and y else None
    return Calibration(resolution, 1 if resolution else None, unit if resolution else None, z)


def native(array: Any) -> np.ndarray:
    """An array in native byte order (big-endian TIFFs map as such), as read_image returns it."""
    array = np.asarray(array)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


__all__ = [
    "CHANNEL_AXES",
    "Calibration",
    "DEFAULT_MAX_PIXELS",
    "IMAGEJ_DTYPES",
    "IMAGEJ_UNITS",
    "ImageReadError",
    "InputImage",
    "OME_UNITS",
    "PLANE_AXES",
    "Spacing",
    "_ratio",
    "check_compression",
    "check_pixels",
    "native",
    "spacing_calibration",
    "tiff_spacing",
]
