"""Prediction of volumes by 3-D models (3-D TIFF stacks, NIfTI, OME-Zarr): files in, outputs out, geometry kept.

A 3-D model predicts the whole volume in 3-D tiles, slab by slab along Z
(`unetseg.inference.volume`), normalised with the percentiles of the whole volume as its
training was. Files given to a 2-D model never come here: `unetseg.inference.pipeline` predicts
and labels them plane by plane, whatever the container. `predict_volume` itself still takes a
2-D model (each plane normalised by itself) and then labels its planes by one 3-D watershed, as
`experiments/volumes_vs_planes.py` compares. Masks and probabilities of TIFF outputs are written
slab by slab through a memory map; NIfTI and OME-Zarr outputs, instance labels (a 3-D watershed
that needs the whole probability volume) and several outputs of one run are made in memory. NIfTI
outputs keep the input's affine and header; TIFF outputs carry the voxel size (ImageJ spacing,
OME PhysicalSizeZ); OME-Zarr outputs carry it as their scale. Measurements (`--measure`) are a
CSV of the labels' objects in 3-D: volume, centroid, bounding box and mean intensity, in voxels
and in the file's unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from unetseg.inference import iter_predict_bands
from unetseg.inference.overlay import write_overlay
from unetseg.inference.postprocess import to_labels, to_mask
from unetseg.inference.volume import iter_predict_slabs, per_axis
from unetseg.io.files import TIFF_SUFFIXES, image_suffix
from unetseg.io.measure import measure_volume, write_rows
from unetseg.io.nifti import is_nifti, write_nifti
from unetseg.io.normalize import ChannelBands, plane_range
from unetseg.io.tiff import atomic_memmap, release_pages, write_tiff
from unetseg.io.volumes import InputVolume, VolumeChannels, open_volume, volume_range
from unetseg.io.zarr import is_zarr_target
from unetseg.spec import InputSpec

__all__ = [
    "VolumeTiling",
    "model_spatial_dims",
    "output_suffix",
    "predict_volume",
    "predict_volume_file",
    "predict_volume_outputs",
    "volume_output",
    "volume_outputs",
]


@dataclass(frozen=True)
class VolumeTiling:
    """3-D tiles of a 3-D model, one size per axis (Z, Y, X): thick-slice data want short tiles along Z.

    Blend, batch size, padding, TTA and precision are those of the 2-D `TilingConfig`.
    """

    tile_size: tuple[int, int, int] = (16, 128, 128)
    overlap: tuple[int, int, int] = (4, 32, 32)

    def __post_init__(self):
        tiles, overlaps = per_axis(self.tile_size, "volume tile_size"), per_axis(self.overlap, "volume overlap")
        object.__setattr__(self, "tile_size", tiles)
        object.__setattr__(self, "overlap", overlaps)
        for size, margin in zip(tiles, overlaps):
            if not 0 <= margin < size:
                raise ValueError(f"volume overlap {overlaps} must be >= 0 and < tile_size {tiles} on every axis")


def model_spatial_dims(model: nn.Module) -> int:
    """3 for a volumetric network (`UNet(spatial_dims=3)`), else 2."""
    return int(getattr(model, "spatial_dims", 2))


def output_suffix(source: Path) -> str:
    """The output suffix for an input: NIfTI stays NIfTI (.nii or .nii.gz as given), anything else is TIFF."""
    return image_suffix(source) if is_nifti(source) else ".tif"


def volume_outputs(settings) -> tuple[str, ...]:
    """The output kinds a volume is written as: those asked for, and labels for ROIs and measurements."""
    return tuple(getattr(settings, "outputs", None) or getattr(settings, "kinds", (settings.output,)))


def volume_output(settings) -> str:
    """The output a volume's model run makes: the one kind asked for, or probabilities, from which
    several kinds are then made (`predict_volume_outputs`)."""
    kinds = volume_outputs(settings)
    return kinds[0] if len(kinds) == 1 else "prob"


def _layout(output: str, classes: int, volume_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], np.dtype]:
    """(axes, shape, dtype) of an output of a (Z, Y, X) volume; probabilities of several classes get a C axis (ZCYX)."""
    depth, *plane = volume_shape
    channels = [classes] if output == "prob" and classes > 1 else []
    dtype = np.dtype({"mask": np.uint8, "prob": np.float32, "labels": np.uint32}[output])
    return ("ZCYX" if channels else "ZYX"), (depth, *channels, *plane), dtype


def _slabs(model, spec: InputSpec, volume: InputVolume, settings, path) -> Iterator[tuple[int, int, np.ndarray]]:
    """(z_start, z_stop, probs (classes, planes, Y, X)) over the volume, by a 3-D or a 2-D model; for
    output "mask" the uint8 mask (planes, Y, X), thresholded on the device."""
    common = settings.engine_options(spec)  # batch, blend, padding, TTA, precision
    plane_tiles = {key: common.pop(key) for key in ("tile_size", "overlap")}  # 3-D tiles: settings.volume
    if volume_output(settings) == "mask":  # thresholded on the device: uint8 slabs cross to the host
        threshold = settings.label_options(spec)["threshold"]
        common["band_transform"] = partial(_device_mask, spec=spec, threshold=threshold)
    normalization = spec.normalization
    if model_spatial_dims(model) == 3:
        value_range = volume_range(volume.voxels, spec.in_channels, normalization, path)
        volume_tiling = getattr(settings, "volume", None) or VolumeTiling()
        yield from iter_predict_slabs(
            model,
            VolumeChannels(volume.voxels, spec.in_channels, path),
            tile_size=volume_tiling.tile_size,
            overlap=volume_tiling.overlap,
            normalize=partial(normalization.apply, value_range=value_range),
            **common,
        )
        return
    for z in range(volume.shape[0]):  # a 2-D model: plane by plane, each normalised by itself
        plane = volume.voxels[z]
        value_range = plane_range(plane, spec.in_channels, normalization, path)
        bands = iter_predict_bands(
            model,
            ChannelBands(plane, spec.in_channels, path),
            normalize=partial(normalization.apply, value_range=value_range),
            **plane_tiles,
            **common,
        )
        if volume_output(settings) == "mask":  # uint8 bands (rows, X)
            yield z, z + 1, np.concatenate([band for _, _, band in bands], axis=0)[None]
        else:
            yield z, z + 1, np.concatenate([band for _, _, band in bands], axis=1)[:, None]


def _device_mask(probs, spec: InputSpec, threshold: float):
    """The uint8 mask of a slab (classes, planes, Y, X) of probabilities, computed where they are."""
    if probs.shape[0] != spec.classes:
        raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {spec.classes}")
    return to_mask(probs, threshold, spec.targets)


def predict_volume(
    model: nn.Module,
    spec: InputSpec,
    volume: InputVolume,
    settings,
    out: Any,
    path: str | Path = "volume",
    on_planes: Callable[[int], Any] | None = None,
) -> Any:
    """Predict `volume` into `out`: (Z, Y, X) masks or labels, (Z, Y, X) or (Z, C, Y, X) probabilities.

    `settings` is a `unetseg.inference.pipeline.PredictSettings` (output, post-processing, tiling; its
    `volume` tiling for 3-D models). Labels are made from the whole probability volume by the 3-D
    watershed of `to_labels`, with the voxel spacing where the file gives all of it.
    """
    classes, output = spec.classes, volume_output(settings)
    options = settings.label_options(spec)  # threshold, seed threshold, smallest object: stored or given
    probs_volume = np.empty((classes, *volume.shape), np.float32) if output == "labels" else None
    for start, stop, probs in _slabs(model, spec, volume, settings, path):
        if output == "mask":
            out[start:stop] = probs  # already the uint8 mask (planes, Y, X)
        elif probs.shape[0] != classes:
            raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {classes}")
        elif probs_volume is not None:
            probs_volume[:, start:stop] = probs
        else:
            out[start:stop] = probs[0] if classes == 1 else np.moveaxis(probs, 0, 1)
        release_pages(out)
        if on_planes is not None:
            on_planes(stop - start)
    if probs_volume is not None:
        spacing = volume.spacing if all(volume.spacing) else None
        out[...] = to_labels(probs_volume, spacing=spacing, **options)
    return out


def predict_volume_file(
    model: nn.Module,
    spec: InputSpec,
    source: str | Path,
    targets: dict[str, Path],
    settings,
    progress: bool = False,
) -> int:
    """Predict one volume file into `targets` (a NIfTI or TIFF file per output kind, by its suffix; see
    `unetseg.inference.pipeline.output_targets`); returns the voxels predicted.

    NIfTI targets keep a NIfTI input's affine and header (only the data type changes); TIFF
    targets carry the voxel size as ImageJ resolution and spacing (OME PhysicalSizeX/Y/Z for
    uint32 labels); OME-Zarr targets (*.ome.zarr) carry it as the scale of z, y and x. One TIFF
    mask or probability output is written slab by slab through a memory map; labels, NIfTI,
    OME-Zarr and several outputs are made from the whole volume in memory.
    """
    source = Path(source)
    volume = open_volume(source, getattr(settings, "max_pixels", None))
    kinds, output = volume_outputs(settings), volume_output(settings)
    bar = tqdm(total=volume.shape[0], unit="plane", desc=source.name, leave=False, disable=None if progress else True)
    with bar:
        streamed = len(kinds) == 1 and output != "labels" and not getattr(settings, "overlay", False)
        if streamed and image_suffix(targets[output]) in TIFF_SUFFIXES:
            axes, shape, dtype = _layout(output, spec.classes, volume.shape)
            tiff = volume.calibration.tiff_kwargs(axes, dtype)
            with atomic_memmap(targets[output], shape, dtype, **tiff) as out:
                predict_volume(model, spec, volume, settings, out, source, bar.update)
            made = {}
        else:
            made = predict_volume_outputs(model, spec, volume, settings, source, bar.update)
    for kind, data in made.items():
        write_volume(targets[kind], data, volume)
    if getattr(settings, "measure", False):
        voxels = np.asarray(volume.voxels[:])  # the stored values, read whole as the labels are
        write_rows(targets["measure"], *measure_volume(made["labels"], voxels, volume.spacing, volume.unit))
    if getattr(settings, "rois", False):
        _write_volume_rois(targets["rois"], made["labels"])
    if getattr(settings, "overlay", False):  # the middle plane, with the outlines of the first output
        kind, middle = kinds[0], volume.shape[0] // 2
        threshold = settings.label_options(spec)["threshold"]
        write_overlay(targets["overlay"], volume.voxels[middle], made[kind][middle], kind, threshold)
    return int(np.prod(volume.shape))


def _write_volume_rois(path: Path, labels: np.ndarray) -> None:
    """An ImageJ ROI set of 3-D labels: each object's outline in each of its planes, at that plane's
    position, named <label>-<plane> (1-based, as Fiji counts slices)."""
    from unetseg.io.rois import RoiSet

    rois = RoiSet()
    for z, plane in enumerate(labels):
        rois.add(plane, z=z, plane_in_name=True)
    rois.write(path)


def predict_volume_outputs(
    model: nn.Module,
    spec: InputSpec,
    volume: InputVolume,
    settings,
    path: str | Path = "volume",
    on_planes: Callable[[int], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Every output kind of `settings` for `volume`, in memory, by kind: masks (Z, Y, X) uint8,
    probabilities (Z, Y, X) for one class else (Z, C, Y, X) float32, labels (Z, Y, X) uint16 or
    uint32. Several kinds come from one model run (its probabilities)."""
    kinds, output = volume_outputs(settings), volume_output(settings)
    axes, shape, dtype = _layout(output, spec.classes, volume.shape)
    made = {output: predict_volume(model, spec, volume, settings, np.zeros(shape, dtype), path, on_planes)}
    if len(kinds) > 1:  # the run made probabilities (Z, C, Y, X) or (Z, Y, X): the other kinds come from them
        probs = np.moveaxis(made["prob"], 1, 0) if axes == "ZCYX" else made["prob"][None]  # (classes, Z, Y, X)
        options = settings.label_options(spec)
        if "mask" in kinds:
            made["mask"] = to_mask(probs, options["threshold"], spec.targets)
        if "labels" in kinds:
            made["labels"] = to_labels(probs, spacing=volume.spacing if all(volume.spacing) else None, **options)
    return {kind: _smallest_labels(made[kind]) if kind == "labels" else made[kind] for kind in kinds}


def _smallest_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as uint16 when they fit, else as they are (uint32)."""
    return labels.astype(np.uint16) if labels.max(initial=0) < 2**16 else labels


def write_volume(target: Path, data: np.ndarray, volume: InputVolume) -> None:
    """Write one output of `volume` as NIfTI (the input's geometry), OME-Zarr (its voxel size as the
    scale; masks and labels marked as labels) or TIFF (its voxel size), by `target`'s suffix."""
    if is_nifti(target):
        write_nifti(target, data, like=volume.nifti, spacing=_known(volume.spacing))
    elif is_zarr_target(target):
        from unetseg.io.zarr import OmeZarrWriter

        data = np.moveaxis(data, 1, 0) if data.ndim == 4 else data  # NGFF orders c before z
        label = not np.issubdtype(data.dtype, np.floating)
        store = OmeZarrWriter(
            target, data.shape, data.dtype, "czyx" if data.ndim == 4 else "zyx", volume.calibration, label
        )
        try:
            store.array[...] = data
            store.commit()
        except BaseException:
            store.abort()
            raise
    else:
        axes = "ZCYX" if data.ndim == 4 else "ZYX"
        write_tiff(target, data, **volume.calibration.tiff_kwargs(axes, data.dtype))


def _known(spacing) -> tuple[float, float, float]:
    """A spacing with unknown entries as 1."""
    return tuple(1.0 if value is None else float(value) for value in spacing)
