"""Chunked images: OME-Zarr inputs and outputs, and lazy planes of any chunked array (zarr, tifffile's zarr store).

An OME-Zarr image is opened without reading its pixels: `LazyPlanes` gives the (Z, H, W[, C])
planes that prediction iterates over, each read band by band (`plane[start:stop]` reads only
the chunks of those rows). Axes and pixel size come from the OME-NGFF `multiscales` metadata
(0.4 on zarr v2, 0.5 on zarr v3). Outputs are written chunk by chunk into a new OME-Zarr
image, or into the `labels/` group of the input image, with a nearest-neighbour pyramid and
the input's scale, so napari opens image and labels together. Needs pip install 'unetseg[zarr]'.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.io.source import (
    CHANNEL_AXES,
    DEFAULT_MAX_PIXELS,
    PLANE_AXES,
    Calibration,
    ImageReadError,
    check_pixels,
)

__all__ = ["ZARR_SUFFIX", "LazyPlanes", "OmeZarrWriter", "is_zarr", "is_zarr_target", "ngff_scale", "open_zarr"]

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
CHUNK = 1024  # rows and columns of an output chunk
MAX_CHUNKS_LISTED = 1_000_000  # inputs with more chunks are not checked for missing ones
PYRAMID_MIN_SIDE = 256  # levels are added (halving y and x) while the last one is larger than this
# OME-NGFF unit names <-> ImageJ unit names (as `Calibration.unit` holds them)
NGFF_TO_IMAGEJ = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}
IMAGEJ_TO_NGFF = {"micron": "micrometer", "um": "micrometer", "µm": "micrometer", "\\u00B5m": "micrometer"} | {
    value: key for key, value in NGFF_TO_IMAGEJ.items() if value != "micron"
}


def _zarr():
    """The zarr module, or an ImportError saying how to install it."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError("zarr is not installed; OME-Zarr needs pip install 'unetseg[zarr]'") from error
    return zarr


def is_zarr_target(path: str | Path) -> bool:
    """True for an output path that is written as OME-Zarr: x.ome.zarr, or IMAGE.zarr/labels/NAME."""
    path = Path(path)
    return ZARR_SUFFIX in (path.suffix.lower(), path.parent.parent.suffix.lower())


def is_zarr(path: str | Path) -> bool:
    """True for a .zarr (or .ome.zarr) folder."""
    path = Path(path)
    return path.suffix.lower() == ZARR_SUFFIX and path.is_dir()


class LazyPlanes:
    """(Z, H, W[, C]) planes of a chunked array stored in another axis order, read only when sliced.

    Hand-written, not zarr's own slicing: zarr arrays have no lazy transposed view, and a dask
    array (which has one) would make dask a dependency of reading one file.

    `planes[z]` is a lazy plane; `planes[z][start:stop]` reads rows start..stop as a numpy
    array (rows, W[, C]); `planes[start:stop]` reads whole planes (Z, H, W[, C]), as 3-D
    prediction reads slabs. `order` maps the planes' axes (Z, Y, X[, C]) to the stored ones and
    `fixed` fixes the stored axes that are dropped (singletons such as T = 0) to an index.
    """

    def __init__(self, array: Any, order: list[int], fixed: dict[int, int], owner: Any = None):
        self.array, self.order, self.fixed, self.owner = array, order, fixed, owner  # owner: keeps a store open
        self.shape = tuple(int(array.shape[axis]) if axis is not None else 1 for axis in order)
        self.dtype = np.dtype(array.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z: int | slice) -> _LazyPlane | np.ndarray:
        if isinstance(z, slice):
            planes = [self.read(index, slice(None)) for index in range(*z.indices(len(self)))]
            return np.stack(planes) if planes else np.empty((0, *self.shape[1:]), self.dtype)
        if not -len(self) <= z < len(self):
            raise IndexError(f"plane {z} of {len(self)}")
        return _LazyPlane(self, z % len(self))

    def __iter__(self):
        return (self[z] for z in range(len(self)))

    def read(self, z: int, rows: slice) -> np.ndarray:
        """Rows of plane z as (rows, W[, C]), reading only their chunks."""
        index: list[Any] = [slice(None)] * len(self.array.shape)
        for axis, value in self.fixed.items():
            index[axis] = value
        plane_axis, y_axis = self.order[0], self.order[1]
        if plane_axis is not None:
            index[plane_axis] = z
        index[y_axis] = rows
        block = np.asarray(self.array[tuple(index)])
        kept = [axis for axis in range(len(self.array.shape)) if axis not in self.fixed and axis != plane_axis]
        return np.transpose(block, [kept.index(axis) for axis in self.order[1:]])


class _LazyPlane:
    """One plane of `LazyPlanes`: sliced by rows only, as the band readers slice it."""

    def __init__(self, planes: LazyPlanes, z: int):
        self.planes, self.z, self.shape, self.dtype = planes, z, planes.shape[1:], planes.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(rows, slice):
            raise IndexError("a lazy plane is read by rows: plane[start:stop(:step)][, ...]")
        block = self.planes.read(self.z, rows)
        return block[(slice(None), *rest)] if rest else block

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array.astype(dtype) if dtype is not None else array


def lazy_planes(array: Any, axes: str, path: Path, owner: Any = None) -> tuple[LazyPlanes, bool, str]:
    """(planes, stack, plane axis) of a chunked array with tifffile-style axes (YX, CYX, TCZYX...)."""
    problem = f"{path}: cannot use a {'x'.join(map(str, array.shape))} image with axes {axes}"
    if len(axes) != len(array.shape) or "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"{problem}; expected Y and X axes")
    fixed = {i: 0 for i, letter in enumerate(axes) if letter not in "YX" + CHANNEL_AXES and array.shape[i] == 1}
    channel = [i for i, letter in enumerate(axes) if letter in CHANNEL_AXES]
    others = [i for i, letter in enumerate(axes) if letter not in "YX" + CHANNEL_AXES and i not in fixed]
    if len(channel) > 1 or len(others) > 1 or (others and axes[others[0]] not in PLANE_AXES):
        raise ImageReadError(f"{problem}; expected one 2D image or one Z stack, with at most one channel axis")
    order = [others[0] if others else None, axes.index("Y"), axes.index("X")] + channel
    planes = LazyPlanes(array, order, fixed, owner)
    return planes, bool(others), "T" if others and axes[others[0]] == "T" else "Z"


def _ome_attributes(group: Any) -> dict:
    """The OME metadata of a group: under "ome" on zarr v3 (NGFF 0.5), the attributes themselves on v2."""
    attributes = dict(group.attrs)
    return attributes.get("ome", attributes)


def open_zarr(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Open an OME-Zarr image (its full-resolution level) as an `InputImage`, lazily; ImageReadError if unusable.

    Images whose metadata claim more than `max_pixels` pixels (planes x height x width) are refused
    before anything else is looked at (None: no cap).
    """
    from unetseg.io.source import InputImage

    zarr, path = _zarr(), Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        multiscales = _ome_attributes(group).get("multiscales")
        if not multiscales:
            raise ValueError("no OME-NGFF multiscales metadata")
        (first,) = multiscales[:1]
        axes = [axis["name"] if isinstance(axis, dict) else axis for axis in first["axes"]]
        dataset = first["datasets"][0]
        array = group[dataset["path"]]
    except (ImageReadError, ImportError):
        raise
    except Exception as error:  # zarr raises its own errors on missing or broken stores
        raise ImageReadError(f"{path}: cannot open as OME-Zarr ({type(error).__name__}: {error})") from None
    _check_array(array, axes, path)
    letters = "".join({"c": "C", "t": "T", "z": "Z", "y": "Y", "x": "X"}.get(name.lower(), "Q") for name in axes)
    planes, stack, plane_axis = lazy_planes(array, letters, path)
    check_pixels(path, planes.shape[:3], 1, max_pixels)
    _warn_missing_chunks(array, dataset["path"], path)
    try:
        calibration = _calibration(first, dataset, axes)
    except (ValueError, TypeError, ArithmeticError, KeyError, IndexError) as error:
        log.warning("%s: pixel size metadata ignored, it cannot be used (%s)", path, error)
        calibration = Calibration()
    return InputImage(planes, stack, plane_axis, calibration)


def _check_array(array: Any, axes: list, path: Path) -> None:
    """ImageReadError when crafted metadata makes the array unusable: no pixels, chunks of size 0, a data type
    that is not an image, an axis named twice."""
    shape, chunks = tuple(int(n) for n in array.shape), tuple(int(n) for n in array.chunks)
    if min(shape, default=0) < 1:
        raise ImageReadError(f"{path}: has no pixels (shape {'x'.join(map(str, shape))})")
    if min(chunks, default=0) < 1:
        raise ImageReadError(f"{path}: chunk shape {chunks} has a side < 1")
    if np.dtype(array.dtype).kind not in "uifb":
        raise ImageReadError(f"{path}: data type {array.dtype} is not an image (integers, floats or booleans)")
    names = [str(name).lower() for name in axes]
    if len(set(names)) != len(names):
        raise ImageReadError(f"{path}: axes {', '.join(names)} name an axis twice")


def _warn_missing_chunks(array: Any, level: str, path: Path) -> None:
    """Warn, naming the file, when chunks of the array are not stored: zarr reads them as the fill value."""
    if int(array.nchunks) > MAX_CHUNKS_LISTED:  # listing millions of keys would take longer than it is worth
        log.info("%s: %d chunks; not checked for missing ones", path, array.nchunks)
        return
    try:
        stored, total = int(array.nchunks_initialized), int(array.nchunks)
    except Exception:  # a store that cannot list its keys: nothing to say
        return
    if stored < total:
        log.warning(
            "%s: %d of %d chunks of level %s are not stored; they read as the fill value %s (zarr leaves out "
            "chunks that hold only that value; an interrupted copy also lacks chunks)",
            path,
            total - stored,
            total,
            level,
            array.fill_value,
        )


def _calibration(multiscale: dict, dataset: dict, axes: list[str]) -> Calibration:
    """The pixel size of level 0 from its scale transformation and the axes' units."""
    scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    if scale is None or "y" not in axes or "x" not in axes:
        return Calibration()
    named = dict(zip(axes, scale))
    if not all(float(step) > 0 and math.isfinite(float(step)) for step in scale):
        raise ValueError(f"scale {scale} is not positive numbers")
    units = {axis["name"]: axis.get("unit") for axis in multiscale["axes"] if isinstance(axis, dict)}
    unit = units.get("x")
    spacing = float(named["z"]) if "z" in named and named["z"] != 1 else None
    return Calibration(
        resolution=(1 / float(named["x"]), 1 / float(named["y"])),
        resolution_unit=1,
        unit=NGFF_TO_IMAGEJ.get(unit, unit) if unit else None,
        spacing=spacing,
    )


def ngff_scale(calibration: Calibration) -> tuple[float, float, str | None]:
    """(y scale, x scale, OME-NGFF unit or None) of a calibration; (1, 1, None) when it has no pixel size."""
    if calibration.resolution is None:
        return 1.0, 1.0, None
    x, y = (value[0] / value[1] if isinstance(value, tuple) else float(value) for value in calibration.resolution)
    unit = {2: "inch", 3: "centimeter"}.get(calibration.resolution_unit) or IMAGEJ_TO_NGFF.get(calibration.unit or "")
    return 1 / y, 1 / x, unit


class OmeZarrWriter:
    """An output array written chunk by chunk into an OME-Zarr image, given its pyramid and metadata by `commit`.

    Args:
        path: a new image folder (*.ome.zarr), or `labels/NAME` inside an OME-Zarr image (the
            image's zarr format and NGFF version are kept, and NAME is added to its labels).
        shape, dtype: of the full-resolution array; axes: its OME-NGFF axis names ("zyx", "cyx"...).
        calibration: the input's pixel size, written as the scale of y and x (and z).
        label: write image-label metadata (for masks and labels).

    The data go to a temporary folder beside `path`, renamed to it by `commit`.
    """

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, axes: str, calibration: Calibration, label: bool):
        zarr = _zarr()
        self.path, self.shape, self.axes, self.label = Path(path), tuple(shape), axes, label
        self.calibration = calibration
        inside = self.path.parent.name == "labels" and self.path.parent.parent.suffix.lower() == ZARR_SUFFIX
        self.parent = self.path.parent.parent if inside else None  # the image whose labels group receives this
        zarr_format = zarr.open_group(str(self.parent), mode="r").metadata.zarr_format if self.parent else 3
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=zarr_format)
        chunks = tuple(CHUNK if name in "yx" else 1 for name in axes)
        self.array = self.group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0)

    def commit(self) -> Path:
        """Build the pyramid, write the metadata, and move the image to `path`."""
        from ome_zarr.writer import write_multiscales_metadata

        levels = [self.array]
        while max(levels[-1].shape[-2:]) > PYRAMID_MIN_SIDE:
            levels.append(self._halve(levels[-1], len(levels)))
        y, x, unit = ngff_scale(self.calibration)
        base = {"y": y, "x": x, "z": self.calibration.spacing or 1.0}
        datasets = [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [base.get(a, 1.0) * (2**level if a in "yx" else 1) for a in self.axes]}
                ],
            }
            for level in range(len(levels))
        ]
        units = {a: unit for a in self.axes if a in "yx" or (a == "z" and self.calibration.spacing)} if unit else None
        axes = [{"name": a, "type": {"c": "channel", "t": "time"}.get(a, "space")} for a in self.axes]
        for axis in axes:
            if units and axis["name"] in units:
                axis["unit"] = units[axis["name"]]
        write_multiscales_metadata(self.group, datasets, axes=axes, name=self.path.name)
        if self.label:
            self.group.attrs.update(_with_image_label(self.group, self.parent is not None))
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial.rename(self.path)
        if self.parent is not None:
            _add_label_name(self.parent, self.path.name)
        return self.path

    def abort(self) -> None:
        """Remove the partial output."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def _halve(self, source: Any, level: int) -> Any:
        """Level `level`: every second row and column of `source` (nearest, so labels stay labels), band by band."""
        shape = tuple(-(-n // 2) if a in "yx" else n for a, n in zip(self.axes, source.shape))
        chunks = tuple(CHUNK if a in "yx" else 1 for a in self.axes)
        target = self.group.create_array(str(level), shape=shape, dtype=source.dtype, chunks=chunks, fill_value=0)
        rows = 2 * CHUNK
        for start in range(0, source.shape[-2], rows):
            band = np.asarray(source[..., start : start + rows, :])
            target[..., start // 2 : (start + rows) // 2, :] = band[..., ::2, ::2]
        return target


def _with_image_label(group: Any, in_image: bool) -> dict:
    """The group's attributes with an `image-label` entry (NGFF: marks labels; `source` points at their image)."""
    attributes = dict(group.attrs)
    entry = {"source": {"image": "../../"}} if in_image else {}
    ome = attributes.get("ome")
    if ome is not None:  # zarr v3: NGFF 0.5 keeps everything under "ome"
        attributes["ome"] = {**ome, "image-label": entry}
    else:
        attributes["image-label"] = {"version": attributes["multiscales"][0].get("version", "0.4"), **entry}
    return attributes


def _add_label_name(image: Path, name: str) -> None:
    """List `name` in the `labels` group of an OME-Zarr image, creating the group's metadata if needed."""
    zarr = _zarr()
    zarr_format = zarr.open_group(str(image), mode="r").metadata.zarr_format  # the labels group matches its image
    labels = zarr.open_group(str(image / "labels"), mode="a", zarr_format=zarr_format)
    listed = _ome_attributes(labels).get("labels", [])
    if name in listed:
        return
    listed = [*listed, name]
    if labels.metadata.zarr_format == 3:
        ome = dict(labels.attrs).get("ome", {"version": "0.5"})
        labels.attrs.update({"ome": {**ome, "labels": listed}})
    else:
        labels.attrs.update({"labels": listed})
