"""Prediction of image files and folders with a trained model: orchestration only, files in, outputs out.

Each input is opened (`unetseg.io.tiff.open_image`), read as its model's training read it
(`to_channels`, then `Normalization` with the range of the whole image, or of each plane of a
Z stack) and predicted tile by tile (`unetseg.inference.iter_predict_bands`). Uncompressed
TIFFs are read through a memory map and masks and probabilities are written through one, band
by band, so a 12000 x 12000 image needs memory in proportion to its width. Every output is
written to a temporary name and renamed, and carries the pixel size of its input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from unetseg.inference import TilingConfig, iter_predict_bands
from unetseg.inference.postprocess import label_settings, to_labels, to_mask_tensor
from unetseg.io import (
    IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    DuplicateNameError,
    ImageReadError,
    find_images,
    is_image_file,
    write_tiff,
)
from unetseg.io.files import image_stem
from unetseg.io.images import DEFAULT_MAX_PIXELS
from unetseg.io.nifti import is_nifti
from unetseg.io.normalize import ChannelBands, plane_range
from unetseg.io.tiff import InputImage, atomic_memmap, open_image, release_pages
from unetseg.io.volumes import InputVolume
from unetseg.predict_volumes import VolumeTiling, model_spatial_dims, output_suffix, predict_volume, predict_volume_file
from unetseg.spec import InputSpec

__all__ = [
    "OUTPUTS",
    "PredictSettings",
    "PredictSummary",
    "plan_outputs",
    "predict_file",
    "predict_files",
    "predict_image",
    "shard",
]

log = logging.getLogger(__name__)

OUTPUTS = ("mask", "prob", "labels")


@dataclass(frozen=True)
class PredictSettings:
    """What to write and how to tile.

    Args:
        output: "mask" (uint8: 0/255 foreground for one class and for targets "boundary",
            the class index for targets "classes"), "prob" (float32 probabilities (classes,
            H, W), (H, W) for one class) or "labels" (uint16/uint32 instance labels by
            `postprocess.to_labels`, for targets "foreground" and "boundary").
        threshold: foreground probability threshold of "mask" and "labels".
        seed_threshold: seed class probability that starts an object in "labels".
        min_size: smallest object, in pixels, kept in "labels".
        tiling: tile size, overlap, batch, blend, TTA and precision of the tiled engine.
        volume: tile size and overlap (Z, Y, X) of 3-D models (`unetseg.predict_volumes`).
        max_pixels: the most pixels (height x width x planes) an input may claim in its header;
            larger ones are refused unread (decompression bombs). None: no cap.

    None for threshold, seed_threshold or min_size means the value the model stores (tuned by
    `unetseg-tune`, in its input spec's `postprocess`), else `POSTPROCESS_DEFAULTS`.
    """

    output: str = "mask"
    threshold: float | None = None
    tiling: TilingConfig = field(default_factory=TilingConfig)
    volume: VolumeTiling = field(default_factory=VolumeTiling)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # inputs claiming more pixels are refused before decoding
    seed_threshold: float | None = None
    min_size: int | None = None

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {self.output!r}")
        label_settings(threshold=self.threshold, seed_threshold=self.seed_threshold, min_size=self.min_size)

    def label_options(self, spec: InputSpec) -> dict:
        """Keyword arguments of `to_labels` (and the threshold of "mask"): defaults, then the model's
        stored post-processing, then these settings where they are not None."""
        return label_settings(
            spec.postprocess, threshold=self.threshold, seed_threshold=self.seed_threshold, min_size=self.min_size
        )

    def check(self, spec: InputSpec) -> None:
        """Raise ValueError when this output cannot be made from a model with this input spec."""
        if self.output == "labels" and not spec.instances:
            raise ValueError(
                f"output 'labels' needs a model trained with targets 'foreground' or 'boundary'; "
                f"this one predicts {spec.classes} classes (targets {spec.targets!r})"
            )

    def engine_options(self) -> dict:
        """Keyword arguments of `iter_predict_bands`."""
        return vars(self.tiling).copy()


def _layout(settings: PredictSettings, spec: InputSpec, image: InputImage) -> tuple[tuple, np.dtype, str]:
    """(shape, dtype, ImageJ axes) of the output of `image`; labels are made as uint32, then narrowed if they fit."""
    planes, height, width = len(image.planes), image.height, image.width
    classes = spec.classes if settings.output == "prob" and spec.classes > 1 else 0
    shape = ((planes,) if image.stack else ()) + ((classes,) if classes else ()) + (height, width)
    axes = (image.plane_axis if image.stack else "") + ("C" if classes else "") + "YX"
    dtype = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}[settings.output]
    return shape, np.dtype(dtype), axes


def _predict_planes(
    model: nn.Module,
    spec: InputSpec,
    image: InputImage,
    settings: PredictSettings,
    out: Any,
    path: str | Path = "image",
    on_rows: Callable[[int], Any] | None = None,
) -> None:
    """Predict every plane of `image` into `out` (planes, [classes,] H, W), band by band."""
    normalization = spec.normalization
    in_channels, classes = spec.in_channels, spec.classes
    options = settings.label_options(spec)
    for z, plane in enumerate(image.planes):
        value_range = plane_range(plane, in_channels, normalization, path)
        mask = settings.output == "mask"  # thresholded on the device: uint8 bands cross to the host
        bands = iter_predict_bands(
            model,
            ChannelBands(plane, in_channels, path),
            normalize=partial(normalization.apply, value_range=value_range),
            band_transform=partial(_device_mask, spec=spec, threshold=options["threshold"]) if mask else None,
            **settings.engine_options(),
        )
        whole = settings.output == "labels"  # labels need the whole plane's probabilities
        probs_plane = np.empty((classes, image.height, image.width), np.float32) if whole else None
        for start, stop, probs in bands:
            if mask:
                out[z, start:stop] = probs  # already the uint8 mask
            elif probs_plane is not None:
                _check_classes(probs, spec)
                probs_plane[:, start:stop] = probs
            else:
                _check_classes(probs, spec)
                out[z, ..., start:stop, :] = probs[0] if classes == 1 else probs
            release_pages(out)
            if on_rows is not None:
                on_rows(stop - start)
        if probs_plane is not None:
            out[z] = to_labels(probs_plane, **options)


def _check_classes(probs: Any, spec: InputSpec) -> None:
    """Raise ValueError when the model's probabilities (classes, ...) do not have the classes of its input spec."""
    if probs.shape[0] != spec.classes:
        raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {spec.classes}")


def _device_mask(probs: Any, spec: InputSpec, threshold: float) -> Any:
    """The uint8 mask of a band of probabilities, computed where they are (`to_mask_tensor`)."""
    _check_classes(probs, spec)
    return to_mask_tensor(probs, threshold, spec.targets)


def _smallest_labels(labels: np.ndarray) -> np.ndarray:
    """uint16 labels where they fit, as `to_labels` returns them, else uint32."""
    return labels.astype(np.uint16) if labels.max(initial=0) < 2**16 else labels


def predict_image(
    model: nn.Module, input_spec: InputSpec, image: np.ndarray, settings: PredictSettings = PredictSettings()
) -> np.ndarray:
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
    if model_spatial_dims(model) == 3:  # a volume (Z, Y, X[, C]) in 3-D tiles
        if image.ndim not in (3, 4):
            raise ValueError(f"a 3-D model predicts volumes (Z, Y, X) or (Z, Y, X, C); got shape {image.shape}")
        classes = input_spec.classes if settings.output == "prob" and input_spec.classes > 1 else 0
        shape = (image.shape[0], *([classes] if classes else []), *image.shape[1:3])
        dtype = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}[settings.output]
        out = predict_volume(model, input_spec, InputVolume(image), settings, np.zeros(shape, dtype))
        return _smallest_labels(out) if settings.output == "labels" else out
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


def predict_file(
    model: nn.Module,
    input_spec: InputSpec,
    source: str | Path,
    target: str | Path,
    settings: PredictSettings = PredictSettings(),
    progress: bool = False,
) -> int:
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
    if is_nifti(source) or model_spatial_dims(model) == 3:
        return predict_volume_file(model, input_spec, source, target, settings, progress)
    image = open_image(source, settings.max_pixels)
    shape, dtype, axes = _layout(settings, input_spec, image)
    planes = len(image.planes)
    with tqdm(
        total=planes * image.height, unit="row", desc=source.name, leave=False, disable=None if progress else True
    ) as bar:
        if settings.output == "labels":
            labels = np.zeros(shape, dtype)
            _predict_planes(
                model, input_spec, image, settings, labels if image.stack else labels[None], source, bar.update
            )
            labels = _smallest_labels(labels)
            write_tiff(target, labels, **image.calibration.tiff_kwargs(axes, labels.dtype))
        else:
            with atomic_memmap(target, shape, dtype, **image.calibration.tiff_kwargs(axes, dtype)) as out:
                _predict_planes(
                    model, input_spec, image, settings, out if image.stack else out[None], source, bar.update
                )
    return planes * image.height * image.width


# --- Folders -----------------------------------------------------------------------------------------


def plan_outputs(input: str | Path, output: str | Path, glob: str | None = None) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs: INPUT's image files, searched recursively, mirrored under OUTPUT.

    Outputs are TIFF, except for NIfTI inputs, whose outputs are NIfTI of the same suffix.
    A file INPUT gives one pair: OUTPUT itself when it ends in .tif/.tiff/.nii/.nii.gz, else
    OUTPUT/<stem>.tif (.nii.gz for a NIfTI input).
    Hidden files and folders, and anything inside OUTPUT, are not searched. `glob` filters the
    image files by their path relative to INPUT (`PurePath.match`, so "*.tif" matches at any
    depth). Raises ValueError for a missing INPUT, OUTPUT equal to INPUT, no image files, or two
    inputs with one output name.
    """
    root, output = Path(input), Path(output)
    if root.is_file():
        if not is_image_file(root):
            raise ValueError(f"INPUT {root}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        named = output.suffix.lower() in TIFF_SUFFIXES or is_nifti(output)
        target = output if named else output / f"{image_stem(root)}{output_suffix(root)}"
        if target.resolve() == root.resolve():
            raise ValueError(f"OUTPUT {target} is the input file; choose another name")
        if target != output and target.exists() and target.parent.resolve() == root.parent.resolve():
            raise ValueError(
                f"OUTPUT {target} exists beside the input and may be one of your images; it is never "
                "written over: choose another folder, or name the output file"
            )
        return [(root, target)]
    if not root.is_dir():
        raise ValueError(f"INPUT {root}: no such file or folder")
    if output.resolve() == root.resolve():
        raise ValueError(f"OUTPUT {output} is the INPUT folder; outputs would replace inputs, choose another folder")
    inside = output.resolve().is_relative_to(root.resolve())
    try:
        files = find_images(root, glob, exclude=output if inside else None)
    except DuplicateNameError as error:
        raise ValueError(
            f"{error.first} and {error.second} would both be written to {output / error.key}.tif; rename one"
        ) from None
    if not files:
        what = f"matching {glob!r}" if glob else f"({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(f"INPUT {root}: no image files {what} in this folder or below")
    pairs = [(path, output / f"{key}{output_suffix(path)}") for key, path in files.items()]
    inputs = {path.resolve() for path in (files if glob is None else find_images(root)).values()}
    clashes = [target for _, target in pairs if target.resolve() in inputs]
    if clashes:
        raise ValueError(
            f"OUTPUT {clashes[0]} is an input file: outputs must not replace inputs, choose another folder"
        )
    return pairs


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
        return (
            f"{len(self.done)} done, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed; "
            f"{self.pixels / 1e6:.2f} Mpx in {self.seconds:.1f} s{rate}"
        )


def _reason(error: Exception, path: Path) -> str:
    """The message of a file's error without its leading file name; the type too when it is unexpected."""
    message = str(error)
    message = message[len(f"{path}: ") :] if message.startswith(f"{path}: ") else message
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


def predict_files(
    model: nn.Module,
    input_spec: InputSpec,
    pairs: Sequence[tuple[Path, Path]],
    settings: PredictSettings = PredictSettings(),
    overwrite: bool = False,
    progress: bool = True,
) -> PredictSummary:
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
            log.error("%s: %s", source, summary.failed[source])
            log.debug("%s: traceback", source, exc_info=True)
            continue
        summary.seconds += time.perf_counter() - started
        summary.pixels += pixels
        summary.done.append(source)
    return summary
