"""Prediction of one image or file with a trained model: orchestration only, a file in, its outputs out.

Each input is opened (`unetseg.io.tiff.open_image`, `unetseg.io.zarr.open_zarr`), read as its
model's training read it (`to_channels`, then `Normalization` with the range of the whole image,
or of each plane of a Z stack) and predicted tile by tile (`unetseg.inference.iter_predict_bands`).
Uncompressed TIFFs are read through a memory map, compressed and tiled TIFFs and OME-Zarr chunk
by chunk, and every output kind asked for is written from the same bands by `unetseg.inference.sinks`
(labels block by block), so a 12000 x 12000 image needs memory in proportion to its width.
Every output is written to a temporary name and renamed, and carries the pixel size of its input.
Folders (planning, sharding, the loop over files) are `unetseg.inference.batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from unetseg.inference import TilingConfig, iter_predict_bands
from unetseg.inference.overlay import PNG_SUFFIXES, overlay_path, write_overlay
from unetseg.inference.postprocess import to_mask
from unetseg.inference.sinks import FORMATS, OUTPUTS, OutputWriter, open_writers
from unetseg.inference.volume_pipeline import (
    VolumeTiling,
    model_spatial_dims,
    predict_volume_file,
    predict_volume_outputs,
    write_volume,
)
from unetseg.io.domain import DomainReport
from unetseg.io.files import image_stem
from unetseg.io.nifti import is_nifti
from unetseg.io.normalize import ChannelBands, plane_range
from unetseg.io.source import DEFAULT_MAX_PIXELS, InputImage
from unetseg.io.tiff import open_image
from unetseg.io.volumes import InputVolume, open_volume
from unetseg.io.zarr import ZARR_SUFFIX, is_zarr, open_zarr
from unetseg.spec import InputSpec, label_settings

__all__ = ["FORMATS", "OUTPUTS", "PredictSettings", "open_input", "output_targets", "predict_file", "predict_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """What to write and how to tile.

    Args:
        output: one output kind or several (written from one model run): "mask" (uint8: 0/255
            foreground for one class and for targets "boundary", the class index for targets
            "classes"), "prob" (float32 probabilities (classes, H, W), (H, W) for one class) or
            "labels" (uint16/uint32 instance labels by `postprocess.to_labels`, made block by
            block, for targets "foreground" and "boundary").
        threshold: foreground probability threshold of "mask" and "labels".
        seed_threshold: seed class probability that starts an object in "labels".
        min_size: smallest object, in pixels, kept in "labels".
        tiling: tile size, overlap, batch, blend, TTA and precision of the tiled engine.
        volume: tile size and overlap (Z, Y, X) of 3-D models (`unetseg.inference.volume_pipeline`).
        max_pixels: the most pixels (height x width x planes) an input may claim in its header;
            larger ones are refused unread (decompression bombs). None: no cap.
        overlay: also write `<stem>_overlay.png` next to each output: the input with the
            predicted outlines (the middle plane of a stack) of the first output kind.
        format: "tiff" or "ome-zarr" (see `output_targets`).
        rois: also write an ImageJ ROI set (.zip) of the labels.
        measure: also write a CSV of per-object measurements.

    None for threshold, seed_threshold or min_size means the value the model stores (tuned by
    `unetseg-tune`, in its input spec's `postprocess`), else `POSTPROCESS_DEFAULTS`.
    """

    output: str | tuple[str, ...] = "mask"
    threshold: float | None = None
    tiling: TilingConfig = field(default_factory=TilingConfig)
    volume: VolumeTiling = field(default_factory=VolumeTiling)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # inputs claiming more pixels are refused before decoding
    seed_threshold: float | None = None
    min_size: int | None = None
    overlay: bool = False
    format: str = "tiff"
    rois: bool = False
    measure: bool = False

    def __post_init__(self):
        unknown = [kind for kind in self.kinds if kind not in OUTPUTS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)} (or several, each once); got {self.output!r}")
        label_settings(threshold=self.threshold, seed_threshold=self.seed_threshold, min_size=self.min_size)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The output kinds asked for, in order."""
        return (self.output,) if isinstance(self.output, str) else tuple(self.output)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output kinds written: those asked for, and labels for ROIs and measurements."""
        return self.kinds + (("labels",) if (self.rois or self.measure) and "labels" not in self.kinds else ())

    def label_options(self, spec: InputSpec) -> dict:
        """Keyword arguments of `to_labels` (and the threshold of "mask"): defaults, then the model's
        stored post-processing, then these settings where they are not None."""
        return label_settings(
            spec.postprocess, threshold=self.threshold, seed_threshold=self.seed_threshold, min_size=self.min_size
        )

    def check(self, spec: InputSpec) -> None:
        """Raise ValueError when these outputs cannot be made from a model with this input spec."""
        if "labels" in self.outputs and not spec.instances:
            what = "output 'labels'" if "labels" in self.kinds else "--rois/--measure"
            raise ValueError(
                f"{what} needs a model trained with targets 'foreground' or 'boundary'; "
                f"this one predicts {spec.classes} classes (targets {spec.targets!r})"
            )

    def check_target(self, target: Path, stack: bool = False) -> None:
        """Raise ValueError when `target`'s format cannot hold this output (PNG: one 8/16-bit plane)."""
        if target.suffix.lower() in PNG_SUFFIXES and ("prob" in self.outputs or stack):
            what = "float probabilities" if "prob" in self.outputs else "a stack"
            raise ValueError(f"{target}: PNG holds one plane of 8/16-bit masks or labels, not {what}; write .tif")

    def tta(self, spec: InputSpec) -> bool:
        """Whether to average the 8 flips and quarter turns of each tile: as asked, else as the model says."""
        return spec.tta if self.tiling.tta is None else self.tiling.tta

    def engine_options(self, spec: InputSpec) -> dict:
        """Keyword arguments of `iter_predict_bands` for a model with this input spec."""
        return {**vars(self.tiling), "tta": self.tta(spec)}


def _predict_planes(
    model: nn.Module,
    spec: InputSpec,
    image: InputImage,
    settings: PredictSettings,
    writers: Sequence[OutputWriter],
    path: str | Path = "image",
    on_rows: Callable[[int], Any] | None = None,
) -> None:
    """Predict every plane of `image` once, band by band, handing each band to every writer."""
    normalization = spec.normalization
    in_channels = spec.in_channels
    threshold = settings.label_options(spec)["threshold"]
    # A mask alone is thresholded on the device: uint8 bands cross to the host.
    device_mask = [writer.kind for writer in writers] == ["mask"]
    for z, plane in enumerate(image.planes):
        value_range = plane_range(plane, in_channels, normalization, path)
        bands = iter_predict_bands(
            model,
            ChannelBands(plane, in_channels, path),
            normalize=partial(normalization.apply, value_range=value_range),
            band_transform=partial(_device_mask, spec=spec, threshold=threshold) if device_mask else None,
            **settings.engine_options(spec),
        )
        for writer in writers:
            writer.start_plane(z)
        for start, stop, probs in bands:
            if not device_mask:
                _check_classes(probs, spec)
            for writer in writers:
                writer.band(z, start, stop, probs)
            if on_rows is not None:
                on_rows(stop - start)
        for writer in writers:
            writer.end_plane(z)


def _check_classes(probs: Any, spec: InputSpec) -> None:
    """Raise ValueError when the model's probabilities (classes, ...) do not have the classes of its input spec."""
    if probs.shape[0] != spec.classes:
        raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {spec.classes}")


def _device_mask(probs: Any, spec: InputSpec, threshold: float) -> Any:
    """The uint8 mask of a band of probabilities, computed where they are (`to_mask`)."""
    _check_classes(probs, spec)
    return to_mask(probs, threshold, spec.targets)


def predict_image(
    model: nn.Module, input_spec: InputSpec, image: np.ndarray, settings: PredictSettings = PredictSettings()
) -> np.ndarray | dict[str, np.ndarray]:
    """Predict an image held in memory, as `predict_file` predicts a file.

    Args:
        model: a network from `load_predictor`, on the device to run on.
        input_spec: the checkpoint's input spec (channels, normalisation, targets, classes).
        image: (H, W), (H, W, C) with C in 1, 3, 4, or a stack (Z, H, W) / (Z, H, W, C).
        settings: the output kind(s), threshold and tiling (ROIs and measurements are for files).

    Returns the mask (H, W) uint8, probabilities (classes, H, W) float32 ((H, W) for one
    class) or labels (H, W) uint16/uint32; stacks get a leading Z axis. Several output kinds
    give a dict of them by kind.
    """
    settings.check(input_spec)
    image = np.asarray(image)
    if model_spatial_dims(model) == 3:  # a volume (Z, Y, X[, C]) in 3-D tiles
        if image.ndim not in (3, 4):
            raise ValueError(f"a 3-D model predicts volumes (Z, Y, X) or (Z, Y, X, C); got shape {image.shape}")
        made = predict_volume_outputs(model, input_spec, InputVolume(image), settings)
        return made[settings.output] if isinstance(settings.output, str) else made
    if image.ndim == 2 or image.ndim == 3 and image.shape[-1] <= 4:
        arranged = InputImage(image[None])
    elif image.ndim in (3, 4):
        arranged = InputImage(image, stack=True)
    else:
        raise ValueError(f"image must be (H, W), (H, W, C), (Z, H, W) or (Z, H, W, C); got shape {image.shape}")
    with ExitStack() as stack:
        options = settings.label_options(input_spec)
        writers = open_writers(settings.kinds, dict.fromkeys(settings.kinds), input_spec, arranged, options, stack)
        _predict_planes(model, input_spec, arranged, settings, writers)
        results = {writer.kind: writer.close() for writer in writers}
    return results[settings.output] if isinstance(settings.output, str) else results


def output_targets(source: str | Path, target: str | Path, settings: PredictSettings) -> dict[str, Path]:
    """Where each output of `source` goes, by kind ("mask", "prob", "labels", "rois", "measure", "overlay").

    One output kind: `target` itself (a TIFF or PNG), or <stem>.ome.zarr beside it with format
    "ome-zarr"; several: <stem>_<kind>.tif / .ome.zarr. For an OME-Zarr input with format
    "ome-zarr", labels and masks go into the input image's labels group (IMAGE.zarr/labels/<kind>),
    where napari finds them with the image. ROIs: <stem>_rois.zip; measurements: <stem>_objects.csv;
    overlay: <stem>_overlay.png.
    """
    source, target = Path(source), Path(target)
    stem = image_stem(target)
    zarr_out = settings.format == "ome-zarr"
    suffix = ".ome" + ZARR_SUFFIX if zarr_out else target.name[len(stem) :] or ".tif"  # .nii.gz kept whole
    kinds = settings.outputs
    targets = {}
    for kind in kinds:
        if zarr_out and kind != "prob" and is_zarr(source):
            targets[kind] = source / "labels" / kind
        elif len(kinds) == 1 and not zarr_out:
            targets[kind] = target
        else:
            targets[kind] = target.with_name(stem + (f"_{kind}" if len(kinds) > 1 else "") + suffix)
    if settings.rois:
        targets["rois"] = target.with_name(f"{stem}_rois.zip")
    if settings.measure:
        targets["measure"] = target.with_name(f"{stem}_objects.csv")
    if settings.overlay:
        targets["overlay"] = overlay_path(target)
    return targets


def open_input(source: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputImage:
    """An image file or an OME-Zarr image (*.zarr folder), opened lazily for prediction."""
    return open_zarr(source) if is_zarr(source) else open_image(source, max_pixels)


def predict_file(
    model: nn.Module,
    input_spec: InputSpec,
    source: str | Path,
    target: str | Path,
    settings: PredictSettings = PredictSettings(),
    progress: bool = False,
    domain: DomainReport | None = None,
) -> int:
    """Predict an image file (or OME-Zarr image) into outputs of its height and width; returns the pixels predicted.

    Every output kind of `settings` is written from one model run, to the places
    `output_targets` gives: masks and probabilities band by band, labels block by block, each
    into a temporary TIFF (memory-mapped), PNG (masks and labels) or OME-Zarr store renamed into
    place when complete. The input's pixel size is written with the outputs (TIFF: ImageJ
    metadata, OME for uint32 labels; OME-Zarr: the scale of y and x). Stacks are predicted plane
    by plane, each normalised with its own range, into a ZYX stack. With `settings.rois` /
    `measure`, the objects of the labels also go to an ImageJ ROI set and a CSV of measurements.

    Args:
        model, input_spec: from `load_predictor`.
        source: the image file or .zarr folder (see `open_image`, `open_zarr`).
        target: the output TIFF or PNG (see `output_targets` for other formats and several outputs).
        settings: the output kinds, format, threshold and tiling.
        progress: show a progress bar over the rows of the image.
        domain: collects out-of-domain warnings over many files (one per kind); None warns for this file.

    Raises ImageReadError for an input that cannot be read or used, ValueError for a model
    whose output does not match its input spec.
    """
    settings.check(input_spec)
    source = Path(source)
    targets = output_targets(source, target, settings)
    if model_spatial_dims(model) == 3:
        return predict_volume_file(model, input_spec, source, targets, settings, progress)
    # A 2-D model predicts every plane of a stack, whatever holds it: a NIfTI volume goes the TIFF stack's way,
    # its outputs made in memory and written as NIfTI with the input's geometry.
    volume = open_volume(source, settings.max_pixels) if is_nifti(source) else None
    image = open_input(source, settings.max_pixels) if volume is None else volume.as_stack()
    nifti_targets = {kind: targets[kind] for kind in settings.outputs if is_nifti(targets[kind])}
    writer_targets = {kind: None if kind in nifti_targets else target for kind, target in targets.items()}
    for kind in settings.outputs:
        settings.check_target(targets[kind], image.stack)
    (domain or DomainReport()).check(source, image.planes[0], input_spec)
    options = settings.label_options(input_spec)
    rois = measurements = None
    if settings.rois:
        from unetseg.io.rois import RoiSet

        rois = RoiSet()
    if settings.measure:
        from unetseg.io.measure import Measurements

        measurements = Measurements(image.calibration, image.stack)
    planes = len(image.planes)
    with (
        tqdm(
            total=planes * image.height, unit="row", desc=source.name, leave=False, disable=None if progress else True
        ) as bar,
        ExitStack() as stack,
    ):
        writers = open_writers(settings.outputs, writer_targets, input_spec, image, options, stack, rois, measurements)
        _predict_planes(model, input_spec, image, settings, writers, source, bar.update)
        if settings.overlay:
            first, z = writers[0], len(image.planes) // 2
            write_overlay(targets["overlay"], image.planes[z], first.plane(z), first.kind, options["threshold"])
        for writer in writers:
            made = writer.close()
            if writer.kind in nifti_targets:
                write_volume(nifti_targets[writer.kind], made, volume)
        if rois is not None:
            rois.write(targets["rois"])
        if measurements is not None:
            measurements.write(targets["measure"])
    return planes * image.height * image.width
