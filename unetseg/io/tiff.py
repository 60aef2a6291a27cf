"""TIFF files: opening lazily with their axes, pixel size (calibration), and atomic writing.

Uncompressed, contiguous TIFFs are memory-mapped instead of read, compressed or tiled ones are
read chunk by chunk through tifffile's zarr interface (with zarr installed), and band-by-band readers and
writers release the mapped pages as they go (`release_pages`), so a huge image never sits
whole in resident memory. Calibration (TIFF resolution tags, ImageJ unit and spacing, OME
physical sizes) is read from inputs and written to outputs, so masks overlay in Fiji and napari.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from unetseg.io.files import TIFF_SUFFIXES, atomic_output
from unetseg.io.images import read_image
from unetseg.io.source import (
    CHANNEL_AXES,
    DEFAULT_MAX_PIXELS,
    IMAGEJ_UNITS,
    PLANE_AXES,
    Calibration,
    ImageReadError,
    InputImage,
    check_compression,
    check_pixels,
)

log = logging.getLogger(__name__)


def read_calibration(tif: tifffile.TiffFile) -> Calibration:
    """The calibration of an open TIFF: resolution tags and ImageJ unit/spacing, or OME physical sizes.

    Unusable metadata (a pixel size that is not a positive number) is ignored with a warning:
    it must not make a readable image unreadable.
    """
    try:
        return _read_calibration(tif)
    except (ValueError, TypeError, ArithmeticError, KeyError, IndexError) as error:
        log.warning("%s: pixel size metadata ignored, it cannot be used (%s)", tif.filename, error)
        return Calibration()


def _read_calibration(tif: tifffile.TiffFile) -> Calibration:
    """`read_calibration` without the guard."""
    tags = tif.pages.first.tags
    resolution = None
    if "XResolution" in tags and "YResolution" in tags:
        resolution = (tags["XResolution"].value, tags["YResolution"].value)
    unit_tag = tags.get("ResolutionUnit")
    resolution_unit = int(unit_tag.value) if unit_tag is not None else None
    imagej = tif.imagej_metadata or {}
    unit, spacing = imagej.get("unit"), imagej.get("spacing")
    ome = _ome_pixels(tif.ome_metadata) if tif.is_ome else {}
    if ome.get("PhysicalSizeX") is not None:
        size_x = float(ome["PhysicalSizeX"])
        size_y = float(ome.get("PhysicalSizeY", size_x))
        if not (size_x > 0 and size_y > 0 and np.isfinite(size_x) and np.isfinite(size_y)):
            raise ValueError(f"OME PhysicalSizeX/Y {size_x}, {size_y} are not positive numbers")
        ome_unit = ome.get("PhysicalSizeXUnit", "µm")  # the OME schema's default
        resolution, resolution_unit = (1 / size_x, 1 / size_y), 1
        unit = IMAGEJ_UNITS.get(ome_unit, ome_unit)
        spacing = float(ome["PhysicalSizeZ"]) if ome.get("PhysicalSizeZ") is not None else spacing
    return Calibration(resolution, resolution_unit, unit, float(spacing) if spacing is not None else None)


def _ome_pixels(xml: str | None) -> dict:
    """Attributes of the first OME Image's Pixels element (tifffile's `xml2dict`), {} when there is none or the
    XML is broken."""
    try:
        ome = tifffile.xml2dict(xml or "").get("OME") or {}
    except (ElementTree.ParseError, ValueError, TypeError):
        return {}
    image = ome.get("Image") if isinstance(ome, dict) else None
    image = image[0] if isinstance(image, list) and image else image
    pixels = image.get("Pixels") if isinstance(image, dict) else None
    return pixels if isinstance(pixels, dict) else {}


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputImage:
    """Open an image file for prediction: PNG/JPEG/BMP/TIFF, grey or RGB(A), 2D or a ZYX TIFF stack.

    TIFF axes come from its ImageJ or OME metadata when it has them; otherwise a 3D array whose
    last axis has at most 4 entries holds channels (H, W, C) and any other is a stack (Z, H, W).
    Raises ImageReadError naming the file for anything that is not such an image, or that
    claims more than `max_pixels` pixels in its header (checked before decoding; None: no cap).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        image = read_image(path, max_pixels)  # PNG, JPEG and BMP hold one 2D image
        if image.ndim not in (2, 3):
            raise ImageReadError(f"{path}: cannot use an image of shape {image.shape}; expected (H, W) or (H, W, C)")
        return InputImage(image[None])
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype, offset = tuple(series.shape), series.axes, series.dtype, series.dataoffset
            described = tif.is_imagej or tif.is_ome
            calibration = read_calibration(tif)
            channels = math.prod(side for side, axis in zip(shape, axes) if axis in CHANNEL_AXES)
            if not described and _generic_axes(shape, axes) == "YXS":
                channels = shape[-1]
    except Exception as error:  # tifffile raises its own, struct, value and index errors on broken files
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
    check_pixels(path, shape, channels, max_pixels)
    check_compression(path, shape, dtype, offset is not None)
    array = None
    if offset is not None and dtype.kind in "uif":  # uncompressed and contiguous: map, don't read
        needed = offset + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < needed:
            raise ImageReadError(f"{path}: file is truncated ({path.stat().st_size} bytes; its pixels need {needed})")
        try:
            array = tifffile.memmap(path, mode="r")
        except ValueError:  # a layout tifffile does not map after all; read it instead
            array = None
    if array is None and dtype.kind in "uif":  # compressed or tiled: stream chunks, don't read the whole image
        streamed = _stream(path, axes if described else _generic_axes(shape, axes))
        if streamed is not None:
            return InputImage(*streamed, calibration)
    if array is None:
        array = read_image(path, max_pixels)
    if array.shape != shape:
        raise ImageReadError(f"{path}: read shape {array.shape} differs from the stored {shape}")
    planes, stack, plane_axis = _arrange(array, axes if described else _generic_axes(shape, axes), path)
    return InputImage(planes, stack, plane_axis, calibration)


def _stream(path: Path, axes: str) -> tuple[Any, bool, str] | None:
    """(planes, stack, plane axis) read chunk by chunk through tifffile's zarr interface; None without zarr."""
    try:
        import zarr

        from unetseg.io.zarr import lazy_planes
    except ImportError:
        return None
    try:
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        array = zarr.open(store, mode="r")
    except Exception:  # a layout the zarr interface does not serve: read the file instead
        return None
    return lazy_planes(array, axes, path, owner=store)


def _generic_axes(shape: tuple, axes: str) -> str:
    """Axes of a TIFF without ImageJ/OME metadata: (H, W, C) when the last axis is short, else as tifffile says."""
    if len(shape) == 3 and shape[-1] <= 4 and axes[0] in "QI":
        return "YXS"
    return axes


def _arrange(array: Any, axes: str, path: Path) -> tuple[Any, bool, str]:
    """(planes (Z, H, W[, C]), stack, plane axis) from an array and its tifffile axes; views, never copies."""
    problem = f"{path}: cannot use a {'x'.join(map(str, array.shape))} image with axes {axes}"
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"{problem}; expected YX, YXS, ZYX or ZYXS")
    channel = [i for i, letter in enumerate(axes) if letter in CHANNEL_AXES]
    others = [i for i, letter in enumerate(axes) if letter not in "YX" + CHANNEL_AXES]
    if len(channel) > 1 or len(others) > 1 or (others and axes[others[0]] not in PLANE_AXES):
        raise ImageReadError(f"{problem}; expected one 2D image or one Z stack, with at most one channel axis")
    order = others + [axes.index("Y"), axes.index("X")] + channel
    arranged = np.transpose(array, order)
    if not others:
        return arranged[None], False, "Z"
    return arranged, True, "T" if axes[others[0]] == "T" else "Z"


def write_tiff(path: str | Path, array: np.ndarray, **kwargs) -> Path:
    """Write a TIFF atomically (see `atomic_output`); keyword arguments go to `tifffile.imwrite`
    (resolution, metadata, compression...)."""
    with atomic_output(path) as temporary:
        tifffile.imwrite(temporary, array, **kwargs)
    return Path(path)


@contextmanager
def atomic_memmap(path: Path, shape: tuple, dtype: np.dtype, **kwargs) -> Iterator[np.memmap]:
    """A TIFF memory map on a temporary file in `path`'s folder, renamed to `path` when the block succeeds."""
    with atomic_output(path) as temporary:
        out = tifffile.memmap(temporary, shape=shape, dtype=dtype, **kwargs)
        allocate(temporary)
        yield out
        out.flush()
        del out


def allocate(path: Path) -> None:
    """Reserve disk blocks for the whole of a (sparse) file, so a full disk is an OSError now.

    Writing through a memory map into a sparse file on a full disk is not an error the program
    can catch: the kernel kills it with SIGBUS. Filesystems that cannot preallocate are left as they are.
    """
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            failure = OSError(f"cannot reserve {size:,} bytes on disk for the output ({error.strerror})")
            failure.errno = error.errno
            raise failure from None


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of the memory map behind `array` (a view of a `numpy.memmap`).

    Band-by-band readers and writers call it after each band, so a huge memory-mapped image
    does not accumulate in the process's resident memory; the pages stay in the kernel's file
    cache (write-back first: the map is flushed). A no-op for ordinary arrays.
    """
    while array is not None and not isinstance(array, np.memmap):
        array = getattr(array, "base", None)
    mapping = getattr(array, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if array.mode != "r":
        mapping.flush()
    mapping.madvise(mmap.MADV_DONTNEED)
