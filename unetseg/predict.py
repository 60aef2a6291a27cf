"""Prediction of image files and folders with a trained checkpoint: masks, probabilities or labels.

Each input is read as its checkpoint's training read it (`to_channels`, then `Normalization`
with the range of the whole image, or of each plane of a Z stack) and predicted tile by tile
with `unetseg.inference.iter_predict_bands`. Uncompressed TIFFs are read through a memory map
and masks and probabilities are written through one, band by band, so a 12000 x 12000 image
needs memory in proportion to its width. Every output is written to a temporary name and
renamed, and carries the pixel size of its input (TIFF resolution, ImageJ unit and spacing).
"""

from __future__ import annotations

import itertools
import pickle
import re
import sys
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
import torch
from torch import nn
from tqdm import tqdm

from unetseg.inference import iter_predict_bands
from unetseg.io import (
    IMAGE_SUFFIXES,
    PERCENTILE_SAMPLE_ABOVE,
    PERCENTILE_SAMPLES,
    TIFF_SUFFIXES,
    ImageReadError,
    Normalization,
    atomic_output,
    histogram_percentiles,
    is_image_file,
    read_image,
    release_pages,
    to_channels,
    write_tiff,
)
from unetseg.models import build_net, net_state_dict
from unetseg.postprocess import to_labels, to_mask
from unetseg.tiling import check_tiling

__all__ = [
    "OUTPUTS",
    "Calibration",
    "ChannelBands",
    "CheckpointError",
    "InputImage",
    "PredictSettings",
    "PredictSummary",
    "band_to_mask",
    "check_input_spec",
    "load_predictor",
    "open_image",
    "plan_outputs",
    "plane_range",
    "predict_file",
    "predict_files",
    "predict_folder",
    "predict_image",
    "read_calibration",
]

OUTPUTS = ("mask", "prob", "labels")
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
# Networks are rebuilt by importing the class a checkpoint names; only these packages may be imported.
NET_MODULES = ("unetseg.",)
TARGETS_CLASSES = {"foreground": 1, "boundary": 3}  # targets -> classes; "classes" has its own count
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # what an ImageJ hyperstack can hold
CHANNEL_AXES, PLANE_AXES = "SC", "ZTQI"  # tifffile axis letters: samples/channels; slices/frames/pages


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or is refused; the message names the file and why."""


# --- Checkpoints -----------------------------------------------------------------------------------


def load_predictor(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Load a model for prediction and the input spec its checkpoint recorded: (model, input_spec).

    Dispatches on the suffix: .ckpt/.pt/.pth are Lightning checkpoints of `SegmentationModule`,
    loaded as data only (weights_only=True: a checkpoint holding other Python objects is refused,
    and nothing in it runs; TorchScript archives are refused too, being programs); .onnx files
    written by unetseg-export go to `unetseg.export.load_onnx`, an nn.Module whose forward runs
    ONNX Runtime, with the input spec stored in the file.

    Args:
        path: the checkpoint file.
        device: where to move the model; None leaves it on the CPU.

    Returns the model in eval mode and input_spec {"in_channels", "normalization", "targets",
    "classes"}. Raises CheckpointError naming the file when it cannot be used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model, spec = _load_onnx(path)
    elif suffix in CHECKPOINT_SUFFIXES:
        model, spec = _load_checkpoint(path)
    else:
        raise CheckpointError(f"{path}: unknown model file type {suffix!r}; expected {', '.join(CHECKPOINT_SUFFIXES)} "
                              "or .onnx")
    check_input_spec(spec, path)
    if device is not None:
        model = model.to(device)
    return model.eval(), spec


def _load_onnx(path: Path) -> tuple[nn.Module, dict]:
    """An ONNX export run by ONNX Runtime: `unetseg.export.load_onnx(path) -> (nn.Module, input_spec)`."""
    try:
        from unetseg.export import load_onnx

        return load_onnx(path)
    except (ImportError, ValueError, OSError) as error:  # no onnxruntime, not an export, unreadable
        raise CheckpointError(f"{path}: cannot load the ONNX model ({_without_path(str(error), path)})") from None


def _without_path(message: str, path: Path) -> str:
    """`message` without a leading "PATH: " (the caller names the file)."""
    return message[len(f"{path}: "):] if message.startswith(f"{path}: ") else message


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The network of a SegmentationModule checkpoint, and its input spec; tensors and plain data only."""
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused below, not dispatched to torch.jit.load
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        hint = ""
        if found and found.group(1).startswith("unetseg."):
            hint = ("; a checkpoint from Trainer.fit in Python stores the data module's dataclasses: "
                    "checkpoints written by unetseg-train hold plain data")
        raise CheckpointError(
            f"{path}: refused: the checkpoint holds Python objects{what}, not only tensors and plain data; "
            f"loading them could run code, so only weights are loaded (weights_only=True){hint}"
        ) from None
    except Exception as error:  # zip, pickle and EOF errors of damaged or foreign files
        if "TorchScript" in str(error):
            raise CheckpointError(f"{path}: a TorchScript archive; TorchScript is a program, not data, so it is not "
                                  "loaded here: predict with the .ckpt or its .onnx export") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net"), dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a unetseg checkpoint (no state_dict, or no hyper_parameters naming "
                              "the net)")
    class_path = str(hparams["net"].get("class_path", ""))
    if not class_path.startswith(NET_MODULES):
        raise CheckpointError(f"{path}: refused: its network class {class_path!r} is outside "
                              f"{', '.join(NET_MODULES)} (checkpoints may not choose what gets imported)")
    spec = hparams.get("input_spec")
    if not spec:
        raise CheckpointError(f"{path}: has no input_spec (channels and normalisation); it was saved without a "
                              "SegmentationDataModule, so prediction cannot repeat its input normalisation")
    try:
        # The network alone, without Lightning: prediction needs only its weights.
        net = build_net(hparams["net"])
        net.load_state_dict(net_state_dict(checkpoint["state_dict"]))
    except Exception as error:  # wrong keys or shapes, bad init arguments
        raise CheckpointError(f"{path}: cannot rebuild the network ({type(error).__name__}: {error})") from None
    return net, dict(spec)


def check_input_spec(spec: Any, path: str | Path = "checkpoint") -> None:
    """Raise CheckpointError unless `spec` is a complete input spec with consistent targets and classes."""
    problem = None
    if not isinstance(spec, dict) or not {"in_channels", "normalization", "targets", "classes"} <= spec.keys():
        problem = "needs in_channels, normalization, targets and classes"
    elif spec["in_channels"] not in (1, 3):
        problem = f"in_channels must be 1 or 3, got {spec['in_channels']!r}"
    elif spec["targets"] not in (*TARGETS_CLASSES, "classes"):
        problem = f"unknown targets {spec['targets']!r}"
    elif TARGETS_CLASSES.get(spec["targets"], spec["classes"]) != spec["classes"]:
        problem = f"targets {spec['targets']!r} with {spec['classes']} classes"
    else:
        try:
            Normalization(**spec["normalization"])
        except (TypeError, ValueError) as error:
            problem = f"bad normalization {spec['normalization']!r} ({error})"
    if problem:
        raise CheckpointError(f"{path}: unusable input_spec: {problem}")


# --- Settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictSettings:
    """What to write and how to tile.

    Args:
        output: "mask" (uint8: 0/255 foreground for one class and for targets "boundary",
            the class index for targets "classes"), "prob" (float32 probabilities (classes,
            H, W), (H, W) for one class) or "labels" (uint16/uint32 instance labels by
            `postprocess.to_labels`, for targets "foreground" and "boundary").
        threshold: foreground probability threshold of "mask" and "labels".
        tile_size, overlap, batch_size, blend, tta, amp: as `unetseg.inference.iter_predict_bands`.
    """

    output: str = "mask"
    threshold: float = 0.5
    tile_size: int = 256
    overlap: int = 64
    batch_size: int = 8
    blend: str = "gaussian"
    tta: bool = False
    amp: bool | None = None

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {self.output!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        check_tiling(self.tile_size, self.overlap, self.blend)

    def check(self, spec: dict) -> None:
        """Raise ValueError when this output cannot be made from a model with this input spec."""
        if self.output == "labels" and spec["targets"] not in TARGETS_CLASSES:
            raise ValueError(f"output 'labels' needs a model trained with targets 'foreground' or 'boundary'; "
                             f"this one predicts {spec['classes']} classes (targets {spec['targets']!r})")

    def tiling(self) -> dict:
        """Keyword arguments of `iter_predict_bands`."""
        return dict(tile_size=self.tile_size, overlap=self.overlap, batch_size=self.batch_size, blend=self.blend,
                    tta=self.tta, amp=self.amp)


# --- Pixel size --------------------------------------------------------------------------------------


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


def read_calibration(tif: tifffile.TiffFile) -> Calibration:
    """The calibration of an open TIFF: resolution tags and ImageJ unit/spacing, or OME physical sizes."""
    tags = tif.pages.first.tags
    resolution = None
    if "XResolution" in tags and "YResolution" in tags:
        resolution = (tags["XResolution"].value, tags["YResolution"].value)
    unit_tag = tags.get("ResolutionUnit")
    resolution_unit = int(unit_tag.value) if unit_tag is not None else None
    imagej = tif.imagej_metadata or {}
    unit, spacing = imagej.get("unit"), imagej.get("spacing")
    ome = _ome_pixels(tif.ome_metadata) if tif.is_ome else {}
    if ome.get("PhysicalSizeX"):
        size_x = float(ome["PhysicalSizeX"])
        size_y = float(ome.get("PhysicalSizeY", size_x))
        ome_unit = ome.get("PhysicalSizeXUnit", "µm")  # the OME schema's default
        resolution, resolution_unit = (1 / size_x, 1 / size_y), 1
        unit = IMAGEJ_UNITS.get(ome_unit, ome_unit)
        spacing = float(ome["PhysicalSizeZ"]) if ome.get("PhysicalSizeZ") else spacing
    return Calibration(resolution, resolution_unit, unit, float(spacing) if spacing is not None else None)


def _ome_pixels(xml: str | None) -> dict:
    """Attributes of the first OME Image's Pixels element, {} when there is none or the XML is broken."""
    try:
        root = ElementTree.fromstring(xml or "")
    except ElementTree.ParseError:
        return {}
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    return dict(pixels.attrib) if pixels is not None else {}


# --- Reading inputs ----------------------------------------------------------------------------------


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
    memmapped: bool = False

    @property
    def height(self) -> int:
        return int(self.planes.shape[1])

    @property
    def width(self) -> int:
        return int(self.planes.shape[2])


def open_image(path: str | Path) -> InputImage:
    """Open an image file for prediction: PNG/JPEG/BMP/TIFF, grey or RGB(A), 2D or a ZYX TIFF stack.

    TIFF axes come from its ImageJ or OME metadata when it has them; otherwise a 3D array whose
    last axis has at most 4 entries holds channels (H, W, C) and any other is a stack (Z, H, W).
    Raises ImageReadError naming the file for anything that is not such an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        image = read_image(path)  # PNG, JPEG and BMP hold one 2D image
        if image.ndim not in (2, 3):
            raise ImageReadError(f"{path}: cannot use an image of shape {image.shape}; expected (H, W) or (H, W, C)")
        return InputImage(image[None])
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype, offset = tuple(series.shape), series.axes, series.dtype, series.dataoffset
            described = tif.is_imagej or tif.is_ome
            calibration = read_calibration(tif)
    except Exception as error:  # tifffile raises its own, struct, value and index errors on broken files
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
    array = None
    if offset is not None and dtype.kind in "uif":  # uncompressed and contiguous: map, don't read
        needed = offset + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < needed:
            raise ImageReadError(f"{path}: file is truncated ({path.stat().st_size} bytes; its pixels need {needed})")
        try:
            array = tifffile.memmap(path, mode="r")
        except ValueError:  # a layout tifffile does not map after all; read it instead
            array = None
    memmapped = array is not None
    if array is None:
        array = read_image(path)
    if array.shape != shape:
        raise ImageReadError(f"{path}: read shape {array.shape} differs from the stored {shape}")
    planes, stack, plane_axis = _arrange(array, axes if described else _generic_axes(shape, axes), path)
    return InputImage(planes, stack, plane_axis, calibration, memmapped)


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


def _native(array: Any) -> np.ndarray:
    """An array in native byte order (big-endian TIFFs map as such), as read_image returns it."""
    array = np.asarray(array)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


class ChannelBands:
    """A lazy (in_channels, H, W) view of one plane (H, W[, C]): rows are read and converted by `to_channels`
    only when sliced as `view[:, start:stop]`, which is how `iter_predict_bands` reads its input."""

    def __init__(self, plane: Any, in_channels: int, path: str | Path = "image"):
        self.plane, self.in_channels, self.path = plane, in_channels, path
        self.shape = (in_channels, int(plane.shape[0]), int(plane.shape[1]))

    def __getitem__(self, key) -> np.ndarray:
        channels, rows = key
        if channels != slice(None) or not isinstance(rows, slice):
            raise IndexError("ChannelBands supports only view[:, start:stop]")
        start, stop, _ = rows.indices(self.shape[1])
        return read_band(self.plane, start, stop - start, self.in_channels, self.path)


def read_band(plane: Any, start: int, rows: int, in_channels: int, path: str | Path) -> np.ndarray:
    """Rows start to start + rows of a plane as (in_channels, rows, W), memory-mapped pages released."""
    band = to_channels(_native(plane[start:start + rows]), in_channels, path)
    release_pages(plane)
    return band


def plane_range(plane: Any, in_channels: int, normalization: Normalization, path: str | Path = "image",
                chunk_pixels: int = 1 << 22) -> tuple[float, float]:
    """`normalization.range(to_channels(plane, in_channels))`, the range training used, taken band by band.

    Gives exactly the same values (the same histogram for 8/16-bit, the same subsample of
    large float images) without holding the converted plane, so a memory-mapped plane is
    read through once. `chunk_pixels` bounds the pixels converted at a time.
    """
    height, width = int(plane.shape[0]), int(plane.shape[1])
    rows = max(1, chunk_pixels // (width * in_channels))
    bands = ((start, read_band(plane, start, rows, in_channels, path)) for start in range(0, height, rows))
    first_band = next(bands)
    bands = itertools.chain([first_band], bands)  # one band held at a time
    dtype = first_band[1].dtype
    del first_band
    if dtype in (np.uint8, np.uint16):
        counts = np.zeros(np.iinfo(dtype).max + 1, dtype=np.int64)
        for _, band in bands:
            counts += np.bincount(band.reshape(-1), minlength=len(counts))
        return histogram_percentiles(counts, normalization.low, normalization.high)
    size = in_channels * height * width
    step = size // PERCENTILE_SAMPLES if size > PERCENTILE_SAMPLE_ABOVE else 1
    samples = []
    for start, band in bands:
        for channel in range(in_channels):
            first = channel * height * width + start * width  # flat index of this band's first value
            samples.append(band[channel].reshape(-1)[(-first) % step::step].copy())  # not a view: frees the band
    values = np.concatenate(samples)
    return tuple(float(v) for v in np.percentile(values, [normalization.low, normalization.high]))


# --- Predicting --------------------------------------------------------------------------------------


def _layout(settings: PredictSettings, spec: dict, image: InputImage) -> tuple[tuple, np.dtype, str]:
    """(shape, dtype, ImageJ axes) of the output of `image`; labels are made as uint32, then narrowed if they fit."""
    planes, height, width = len(image.planes), image.height, image.width
    classes = spec["classes"] if settings.output == "prob" and spec["classes"] > 1 else 0
    shape = ((planes,) if image.stack else ()) + ((classes,) if classes else ()) + (height, width)
    axes = (image.plane_axis if image.stack else "") + ("C" if classes else "") + "YX"
    dtype = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}[settings.output]
    return shape, np.dtype(dtype), axes


def band_to_mask(probs: np.ndarray, targets: str, threshold: float) -> np.ndarray:
    """(classes, rows, W) probabilities -> uint8 mask; targets "boundary" gives foreground (interior + edge) 0/255."""
    if targets == "boundary":
        return np.where(probs[1] + probs[2] > threshold, 255, 0).astype(np.uint8)
    return to_mask(probs, threshold)


def _predict_planes(model: nn.Module, spec: dict, image: InputImage, settings: PredictSettings, out: Any,
                    path: str | Path = "image", on_rows: Callable[[int], Any] | None = None) -> None:
    """Predict every plane of `image` into `out` (planes, [classes,] H, W), band by band."""
    normalization = Normalization(**spec["normalization"])
    in_channels, classes = spec["in_channels"], spec["classes"]
    for z, plane in enumerate(image.planes):
        value_range = plane_range(plane, in_channels, normalization, path)
        bands = iter_predict_bands(model, ChannelBands(plane, in_channels, path),
                                   normalize=partial(normalization.apply, value_range=value_range),
                                   **settings.tiling())
        whole = settings.output == "labels"  # labels need the whole plane's probabilities
        probs_plane = np.empty((classes, image.height, image.width), np.float32) if whole else None
        for start, stop, probs in bands:
            if probs.shape[0] != classes:
                raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {classes}")
            if probs_plane is not None:
                probs_plane[:, start:stop] = probs
            elif settings.output == "mask":
                out[z, start:stop] = band_to_mask(probs, spec["targets"], settings.threshold)
            else:
                out[z, ..., start:stop, :] = probs[0] if classes == 1 else probs
            release_pages(out)
            if on_rows is not None:
                on_rows(stop - start)
        if probs_plane is not None:
            out[z] = to_labels(probs_plane, settings.threshold)


def _smallest_labels(labels: np.ndarray) -> np.ndarray:
    """uint16 labels where they fit, as `to_labels` returns them, else uint32."""
    return labels.astype(np.uint16) if labels.max(initial=0) < 2**16 else labels


def predict_image(model: nn.Module, input_spec: dict, image: np.ndarray,
                  settings: PredictSettings = PredictSettings()) -> np.ndarray:
    """Predict an image held in memory, as `predict_file` predicts a file.

    Args:
        model: a network from `load_predictor`, on the device to run on.
        input_spec: the checkpoint's input spec (channels, normalisation, targets, classes).
        image: (H, W), (H, W, C) with C in 1, 3, 4, or a stack (Z, H, W) / (Z, H, W, C).
        settings: the output kind, threshold and tiling.

    Returns the mask (H, W) uint8, probabilities (classes, H, W) float32 ((H, W) for one
    class) or labels (H, W) uint16/uint32; stacks get a leading Z axis.
    """
    settings.check(input_spec)
    image = np.asarray(image)
    if image.ndim == 2 or image.ndim == 3 and image.shape[-1] <= 4:
        arranged = InputImage(image[None])
    elif image.ndim in (3, 4):
        arranged = InputImage(image, stack=True)
    else:
        raise ValueError(f"image must be (H, W), (H, W, C), (Z, H, W) or (Z, H, W, C); got shape {image.shape}")
    shape, dtype, _ = _layout(settings, input_spec, arranged)
    out = np.zeros(shape, dtype)
    _predict_planes(model, input_spec, arranged, settings, out if arranged.stack else out[None])
    return _smallest_labels(out) if settings.output == "labels" else out


@contextmanager
def _atomic_memmap(path: Path, shape: tuple, dtype: np.dtype, **kwargs) -> Iterator[np.memmap]:
    """A TIFF memory map on a temporary file in `path`'s folder, renamed to `path` when the block succeeds."""
    with atomic_output(path) as temporary:
        out = tifffile.memmap(temporary, shape=shape, dtype=dtype, **kwargs)
        yield out
        out.flush()
        del out


def predict_file(model: nn.Module, input_spec: dict, source: str | Path, target: str | Path,
                 settings: PredictSettings = PredictSettings(), progress: bool = False) -> int:
    """Predict one image file into a TIFF of the same height and width; returns the pixels predicted.

    Masks and probabilities go band by band into a memory-mapped temporary TIFF, renamed to
    `target` when complete; labels need the whole probability map of a plane in memory. The
    input's pixel size (resolution tags, ImageJ unit/spacing, OME physical size) is written
    with the output as ImageJ metadata (OME for uint32 labels). Stacks are predicted plane by
    plane, each normalised with its own range, into a ZYX stack.

    Args:
        model, input_spec: from `load_predictor`.
        source: the image file (see `open_image`).
        target: the output TIFF; its folder is created.
        settings: the output kind, threshold and tiling.
        progress: show a progress bar over the rows of the image.

    Raises ImageReadError for an input that cannot be read or used, ValueError for a model
    whose output does not match its input spec.
    """
    settings.check(input_spec)
    source, target = Path(source), Path(target)
    image = open_image(source)
    shape, dtype, axes = _layout(settings, input_spec, image)
    planes = len(image.planes)
    with tqdm(total=planes * image.height, unit="row", desc=source.name, leave=False,
              disable=None if progress else True) as bar:
        if settings.output == "labels":
            labels = np.zeros(shape, dtype)
            _predict_planes(model, input_spec, image, settings, labels if image.stack else labels[None], source,
                            bar.update)
            labels = _smallest_labels(labels)
            write_tiff(target, labels, **image.calibration.tiff_kwargs(axes, labels.dtype))
        else:
            with _atomic_memmap(target, shape, dtype, **image.calibration.tiff_kwargs(axes, dtype)) as out:
                _predict_planes(model, input_spec, image, settings, out if image.stack else out[None], source,
                                bar.update)
    return planes * image.height * image.width


# --- Folders -----------------------------------------------------------------------------------------


def plan_outputs(input: str | Path, output: str | Path, glob: str | None = None) -> list[tuple[Path, Path]]:
    """(input file, output TIFF) pairs: INPUT's image files, searched recursively, mirrored under OUTPUT.

    A file INPUT gives one pair: OUTPUT itself when it ends in .tif/.tiff, else OUTPUT/<stem>.tif.
    Hidden files and folders, and anything inside OUTPUT, are not searched. `glob` filters the
    image files by their path relative to INPUT (`PurePath.match`, so "*.tif" matches at any
    depth). Raises ValueError for a missing INPUT, OUTPUT equal to INPUT, no image files, or two
    inputs with one output name.
    """
    root, output = Path(input), Path(output)
    if root.is_file():
        if not is_image_file(root):
            raise ValueError(f"INPUT {root}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        target = output if output.suffix.lower() in TIFF_SUFFIXES else output / f"{root.stem}.tif"
        if target.resolve() == root.resolve():
            raise ValueError(f"OUTPUT {target} is the input file; choose another name")
        return [(root, target)]
    if not root.is_dir():
        raise ValueError(f"INPUT {root}: no such file or folder")
    if output.resolve() == root.resolve():
        raise ValueError(f"OUTPUT {output} is the INPUT folder; outputs would replace inputs, choose another folder")
    output_inside = output.resolve()
    pairs: dict[Path, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not is_image_file(path):
            continue
        if path.resolve().is_relative_to(output_inside):
            continue
        if glob is not None and not PurePosixPath(relative.as_posix()).match(glob):
            continue
        target = output / relative.parent / f"{path.stem}.tif"
        if target in pairs:
            raise ValueError(f"{pairs[target]} and {path} would both be written to {target}; rename one")
        pairs[target] = path
    if not pairs:
        what = f"matching {glob!r}" if glob else f"({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(f"INPUT {root}: no image files {what} in this folder or below")
    return [(source, target) for target, source in pairs.items()]


@dataclass
class PredictSummary:
    """What a batch run did: files predicted, skipped (output exists) and failed (with the reason)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    pixels: int = 0
    seconds: float = 0.0  # time spent predicting the files done

    def __str__(self) -> str:
        rate = ""
        if self.seconds > 0 and self.pixels:
            per_second = self.pixels / self.seconds
            rate = f" ({per_second / 1e6:.2f} Mpx/s)" if per_second >= 1e6 else f" ({per_second / 1e3:.1f} kpx/s)"
        return (f"{len(self.done)} done, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed; "
                f"{self.pixels / 1e6:.2f} Mpx in {self.seconds:.1f} s{rate}")


def _reason(error: Exception, path: Path) -> str:
    """The message of a file's error without its leading file name; the type too when it is unexpected."""
    message = _without_path(str(error), path)
    if not isinstance(error, (ImageReadError, ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return " ".join(message.split())  # one line per file, whatever the reader wrote


def shard(pairs: Sequence[tuple[Path, Path]], index: int, count: int) -> list[tuple[Path, Path]]:
    """This process's share of the files: every count-th pair from `index` (0 <= index < count).

    Shares of one sorted plan are disjoint and together cover it, so processes on one or many
    machines predict a folder together and each output is written exactly once.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return list(pairs[index::count])


def predict_files(model: nn.Module, input_spec: dict, pairs: Sequence[tuple[Path, Path]],
                  settings: PredictSettings = PredictSettings(), overwrite: bool = False,
                  progress: bool = True) -> PredictSummary:
    """Predict each (input, output) pair with `predict_file`; a file that fails does not stop the others.

    Outputs that exist are skipped unless `overwrite`, so an interrupted run resumes where it
    stopped. Each failure is named on stderr as it happens ("error: FILE: reason").
    `progress` shows bars over files and over the rows of each image (on a terminal).
    """
    settings.check(input_spec)
    summary = PredictSummary()
    for source, target in tqdm(pairs, desc="files", unit="file", disable=None if progress else True):
        if target.exists() and not overwrite:
            summary.skipped.append(source)
            continue
        started = time.perf_counter()
        try:
            pixels = predict_file(model, input_spec, source, target, settings, progress)
        except Exception as error:  # one broken file must not stop the folder; MemoryError and friends included
            summary.failed[source] = _reason(error, source)
            tqdm.write(f"error: {source}: {summary.failed[source]}", file=sys.stderr)
            continue
        summary.seconds += time.perf_counter() - started
        summary.pixels += pixels
        summary.done.append(source)
    return summary


def predict_folder(model: nn.Module, input_spec: dict, input: str | Path, output: str | Path,
                   settings: PredictSettings = PredictSettings(), glob: str | None = None, overwrite: bool = False,
                   progress: bool = True) -> PredictSummary:
    """`predict_files` over `plan_outputs(input, output, glob)`: a file or folder into a mirrored folder of TIFFs."""
    return predict_files(model, input_spec, plan_outputs(input, output, glob), settings, overwrite, progress)
