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


@dataclass
class InputImage:
    """An input opened for prediction.

    planes: (Z, H, W) or (Z, H, W, C) in the stored dtype, Z = 1 for a 2D image; a read-only
        memory map of the file where the file allows it (uncompressed, contiguous TIFF).
    stack: True for a Z (or T) stack, predicted plane by plane into a stack of the same depth.
    """

    planes: Any
    stack: bool = False
    plane_axis: str = "Z"
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def height(self) -> int:
        return int(self.planes.shape[1])

    @property
    def width(self) -> int:
        return int(self.planes.shape[2])


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
    "_ratio",
    "check_pixels",
    "native",
]
