"""Prediction of one image, stack or volume with a trained model: orchestration only, a file in, its outputs out.

One path for every model and container. Each input is opened through the registry
(`unetseg.io.registry.open_source`: TIFF and TIFF stacks, PNG, NIfTI, OME-Zarr) as one
`InputImage`, read as its model's training read it (`to_channels`, then `Normalization`) and
predicted tile by tile: a 2-D model predicts every plane by itself, normalised with that plane's
range (`unetseg.inference.iter_predict_bands`), and a 3-D model predicts the planes as one volume
in 3-D tiles, normalised with the whole volume's range (`unetseg.inference.volume.iter_predict_slabs`).
Whatever the container, the same model gives the same outputs. Uncompressed TIFFs are read
through a memory map, compressed and tiled TIFFs, NIfTI and OME-Zarr chunk by chunk, and every
output kind asked for is written from the same bands by `unetseg.inference.sinks` (labels block
by block, in 2-D or 3-D), so memory grows with one band (slab), not with the image (volume).
Every output is written to a temporary name and renamed, and carries the pixel size of its input.
Folders (planning, sharding, the loop over files) are `unetseg.inference.batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from unetseg.inference import TilingConfig, iter_predict_bands
from unetseg.inference.overlay import overlay_path, write_overlay
from unetseg.inference.postprocess import to_mask
from unetseg.inference.sinks import FORMATS, OUTPUTS, OutputWriter, open_writers
from unetseg.inference.volume import VolumeTiling, iter_predict_slabs, spatial_dims
from unetseg.io.domain import DomainReport
from unetseg.io.files import ZARR_SUFFIXES, image_stem, image_suffix
from unetseg.io.normalize import ChannelBands, plane_range
from unetseg.io.registry import container, open_source, output_container
from unetseg.io.source import DEFAULT_MAX_PIXELS, InputImage
from unetseg.io.volumes import VolumeChannels, volume_range
from unetseg.runtime.profiling import stage
from unetseg.spec import InputSpec, label_settings

__all__ = [
    "FORMATS",
    "OUTPUTS",
    "PredictSettings",
    "Prediction",
    "iter_predictions",
    "open_input",
    "output_suffix",
    "output_targets",
    "predict_file",
    "predict_image",
]

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
        volume: tile size and overlap (Z, Y, X) of 3-D models (`unetseg.inference.volume.VolumeTiling`).
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
        if output_container(target) == "png" and ("prob" in self.outputs or stack):
            what = "float probabilities" if "prob" in self.outputs else "a stack"
            raise ValueError(f"{target}: PNG holds one plane of 8/16-bit masks or labels, not {what}; write .tif")

    def tta(self, spec: InputSpec) -> bool:
        """Whether to average the 8 flips and quarter turns of each tile: as asked, else as the model says."""
        return spec.tta if self.tiling.tta is None else self.tiling.tta

    def engine_options(self, spec: InputSpec) -> dict:
        """Keyword arguments of `iter_predict_bands` for a model with this input spec."""
        return {**vars(self.tiling), "tta": self.tta(spec)}


@dataclass(frozen=True, eq=False)
class Prediction:
    """A model, its input spec and the settings, resolved once for every input they predict.

    `dims` (2: the model predicts planes, 3: volumes), the engine's options for those dims (tile
    size and overlap per axis, batch, blend, TTA, precision) and the post-processing (defaults,
    then the model's stored values, then the settings') are worked out here, once; `check`
    refuses outputs the model cannot make before any input is opened. Every input then takes
    one path: `blocks` predicts it (a 2-D model plane by plane, a 3-D model as one volume),
    `run` hands the bands to sinks that only write, and `image` / `file` wrap that for arrays
    and files.
    """

    model: nn.Module
    spec: InputSpec
    settings: PredictSettings = field(default_factory=PredictSettings)
    dims: int = field(init=False)
    label_options: dict = field(init=False)
    engine_options: dict = field(init=False)

    def __post_init__(self):
        self.settings.check(self.spec)
        dims = spatial_dims(self.model)
        options = self.settings.engine_options(self.spec)  # tiling, batch, blend, padding, TTA, precision
        if dims == 3:
            options.update(tile_size=self.settings.volume.tile_size, overlap=self.settings.volume.overlap)
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "label_options", self.settings.label_options(self.spec))
        object.__setattr__(self, "engine_options", options)

    def blocks(
        self, image: InputImage, path: str | Path = "image", device_mask: bool = False
    ) -> Iterator[tuple[int, Iterator[tuple[int, int, Any]]]]:
        """(item, blocks) of `image`: for a 2-D model each plane in turn (item = its index), for a 3-D model
        the one volume (item 0); blocks are (start, stop, probabilities (classes, stop - start, ...)) along
        the first spatial axis, in order, or the uint8 masks (stop - start, ...) with `device_mask`."""
        normalization, in_channels, spec = self.spec.normalization, self.spec.in_channels, self.spec
        options = dict(self.engine_options)
        if device_mask:  # thresholded where the model runs: uint8 masks cross to the host
            options["band_transform"] = partial(_device_mask, spec=spec, threshold=self.label_options["threshold"])
        if self.dims == 3:
            with stage("normalise"):
                value_range = volume_range(image.planes, in_channels, normalization, path)
            normalize = partial(normalization.apply, value_range=value_range)
            volume = VolumeChannels(image.planes, in_channels, path)
            yield 0, iter_predict_slabs(self.model, volume, normalize=normalize, **options)
            return
        for z, plane in enumerate(image.planes):
            with stage("normalise"):
                value_range = plane_range(plane, in_channels, normalization, path)
            normalize = partial(normalization.apply, value_range=value_range)
            bands = ChannelBands(plane, in_channels, path)
            yield z, iter_predict_bands(self.model, bands, normalize=normalize, **options)

    def run(
        self,
        image: InputImage,
        writers: Sequence[OutputWriter],
        path: str | Path = "image",
        on_rows: Callable[[int], Any] | None = None,
    ) -> None:
        """Predict `image` once, handing each band (slab) to every writer."""
        device_mask = [writer.kind for writer in writers] == ["mask"]  # a mask alone is thresholded on the device
        for item, blocks in self.blocks(image, path, device_mask):
            for writer in writers:
                writer.start(item)
            for start, stop, probs in blocks:
                if not device_mask:
                    _check_classes(probs, self.spec)
                for writer in writers:
                    writer.band(item, start, stop, probs)
                if on_rows is not None:
                    on_rows(stop - start)
            for writer in writers:
                writer.end(item)

    def image(self, image: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Predict an image held in memory (see `predict_image`)."""
        settings, dims = self.settings, self.dims
        image = np.asarray(image)
        if dims == 3:  # a volume (Z, Y, X[, C]) in 3-D tiles
            if image.ndim not in (3, 4):
                raise ValueError(f"a 3-D model predicts volumes (Z, Y, X) or (Z, Y, X, C); got shape {image.shape}")
            arranged = InputImage(image, stack=True)
        elif image.ndim == 2 or image.ndim == 3 and image.shape[-1] <= 4:
            arranged = InputImage(image[None])
        elif image.ndim in (3, 4):
            arranged = InputImage(image, stack=True)
        else:
            raise ValueError(f"image must be (H, W), (H, W, C), (Z, H, W) or (Z, H, W, C); got shape {image.shape}")
        with ExitStack() as stack:
            targets = dict.fromkeys(settings.kinds)
            writers = open_writers(settings.kinds, targets, self.spec, arranged, self.label_options, stack, dims=dims)
            self.run(arranged, writers)
            results = {writer.kind: writer.close() for writer in writers}
        return results[settings.output] if isinstance(settings.output, str) else results

    def file(
        self, source: str | Path, target: str | Path, progress: bool = False, domain: DomainReport | None = None
    ) -> int:
        """Predict a file into its outputs; returns the pixels (voxels) predicted (see `predict_file`)."""
        settings, dims, options = self.settings, self.dims, self.label_options
        source = Path(source)
        targets = output_targets(source, target, settings)
        with stage("read"):
            image = open_input(source, settings.max_pixels)
        if dims == 3:
            image.stack = True  # a 2-D image is a volume of one plane to a 3-D model
        for kind in settings.outputs:
            settings.check_target(targets[kind], image.stack)
        (domain or DomainReport()).check(source, image.planes[0], self.spec)
        rois = measurements = None
        if settings.rois:
            from unetseg.io.rois import RoiSet

            rois = RoiSet()
        if settings.measure:
            from unetseg.io.measure import Measurements

            measurements = Measurements.of(image, dims)
        planes = len(image.planes)
        total, unit = (planes, "plane") if dims == 3 else (planes * image.height, "row")
        bar = tqdm(total=total, unit=unit, desc=source.name, leave=False, disable=None if progress else True)
        with bar, ExitStack() as stack:
            kinds = settings.outputs
            writers = open_writers(kinds, targets, self.spec, image, options, stack, rois, measurements, dims)
            self.run(image, writers, source, bar.update)
            with stage("write"):
                if settings.overlay:
                    first, z = writers[0], len(image.planes) // 2
                    write_overlay(targets["overlay"], image.planes[z], first.plane(z), first.kind, options["threshold"])
                for writer in writers:
                    writer.close()
                if rois is not None:
                    rois.write(targets["rois"])
                if measurements is not None:
                    measurements.write(targets["measure"])
        return planes * image.height * image.width


def iter_predictions(
    model: nn.Module,
    spec: InputSpec,
    image: InputImage,
    settings: PredictSettings,
    path: str | Path = "image",
    device_mask: bool = False,
) -> Iterator[tuple[int, Iterator[tuple[int, int, Any]]]]:
    """`Prediction(model, spec, settings).blocks(image, path, device_mask)`."""
    return Prediction(model, spec, settings).blocks(image, path, device_mask)


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
    return Prediction(model, input_spec, settings).image(image)


def output_suffix(source: Path) -> str:
    """The output suffix for an input: NIfTI stays NIfTI (.nii or .nii.gz as given), anything else is TIFF."""
    return image_suffix(source) if container(source) == "nifti" else ".tif"


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
    suffix = ".ome" + ZARR_SUFFIXES[0] if zarr_out else target.name[len(stem) :] or ".tif"  # .nii.gz kept whole
    kinds = settings.outputs
    targets = {}
    for kind in kinds:
        if zarr_out and kind != "prob" and container(source) == "ome-zarr" and source.is_dir():
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
    """Any input (image file, TIFF stack, NIfTI, OME-Zarr), opened lazily for prediction (`open_source`)."""
    return open_source(source, max_pixels)


def predict_file(
    model: nn.Module,
    input_spec: InputSpec,
    source: str | Path,
    target: str | Path,
    settings: PredictSettings = PredictSettings(),
    progress: bool = False,
    domain: DomainReport | None = None,
) -> int:
    """Predict an image, stack or volume file (or OME-Zarr image) into outputs of its shape; returns the
    pixels (voxels) predicted.

    Every output kind of `settings` is written from one model run, to the places
    `output_targets` gives: masks and probabilities band by band, labels block by block, each
    into a temporary TIFF (memory-mapped), PNG (masks and labels), NIfTI (the input's affine and
    header kept) or OME-Zarr store renamed into place when complete. The input's pixel (voxel)
    size is written with the outputs (TIFF: ImageJ metadata, OME for uint32 labels; OME-Zarr:
    the scale; NIfTI: pixdim). A 2-D model predicts the planes of a stack or volume one by one,
    each normalised with its own range, and labels them plane by plane; a 3-D model predicts
    the volume and labels it in 3-D with its voxel size. With `settings.rois` / `measure`, the
    objects of the labels also go to an ImageJ ROI set and a CSV of measurements.

    Args:
        model, input_spec: from `load_predictor`.
        source: the input file or .zarr folder (see `unetseg.io.registry.open_source`).
        target: the output TIFF, PNG or NIfTI (see `output_targets` for other formats and several outputs).
        settings: the output kinds, format, threshold and tiling.
        progress: show a progress bar over the rows of the image (the planes of a volume).
        domain: collects out-of-domain warnings over many files (one per kind); None warns for this file.

    Raises ImageReadError for an input that cannot be read or used, ValueError for a model
    whose output does not match its input spec.
    """
    return Prediction(model, input_spec, settings).file(source, target, progress, domain)
