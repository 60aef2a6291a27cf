"""Writers of a labels layer: an ImageJ ROI set (.zip, for Fiji's ROI Manager) and a CSV of per-object
measurements (with an image layer's intensities when one is saved with it), by `unetseg.io.rois` and
`unetseg.io.measure`, as unetseg-predict --rois / --measure write them."""

from __future__ import annotations

from typing import Any

import numpy as np

from unetseg.io.measure import Measurements
from unetseg.io.rois import RoiSet

__all__ = ["spans_planes", "write_measurements", "write_rois"]


def spans_planes(labels: np.ndarray) -> bool:
    """True when some object of a stack (Z, Y, X) lies in more than one plane: 3-D objects, not a stack of 2-D."""
    seen: set[int] = set()
    for plane in labels:
        found = set(np.unique(plane[plane > 0]).tolist())
        if seen & found:
            return True
        seen |= found
    return False


def _planes(data: Any) -> np.ndarray:
    """A labels layer's data as (Z, Y, X) integers, Z = 1 for 2-D labels (a multiscale layer's finest level)."""
    labels = np.asarray(data[0] if isinstance(data, list) else data)
    if labels.ndim < 2:
        raise ValueError(f"labels have {labels.ndim} axis; 2 or more expected")
    return labels.reshape((-1, *labels.shape[-2:]))


def write_rois(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer as an ImageJ ROI set: one polygon per object (per object and plane in 3-D)."""
    labels = _planes(data)
    stack, three_d = len(labels) > 1, spans_planes(labels)
    rois = RoiSet()
    for z, plane in enumerate(labels):
        rois.add(plane, z=z if stack else None, plane_in_name=three_d)
    return [str(rois.write(path))]


def _unit(meta: dict) -> str | None:
    """The layer's unit of length, None for napari's default (pixels)."""
    units = meta.get("units") or ()
    unit = str(units[-1]) if len(units) else None
    return None if unit in (None, "pixel") else unit


def write_measurements(path: str, layer_data: list[tuple]) -> list[str]:
    """Write the objects of a labels layer as a CSV of measurements (area or volume, centroid, bounding box,
    calibrated by the layer's scale and unit), with the mean intensities of an image layer of the same
    shape when one is saved with it."""
    labels_data, meta = next((data, meta) for data, meta, kind in layer_data if kind == "labels")
    images = [(data, image_meta) for data, image_meta, kind in layer_data if kind == "image"]
    labels = _planes(labels_data)
    shape = np.asarray(labels_data[0] if isinstance(labels_data, list) else labels_data).shape
    if images:
        image = np.asarray(images[0][0][0] if isinstance(images[0][0], list) else images[0][0])
        if image.shape[: len(shape)] != shape or image.ndim > len(shape) + 1:
            raise ValueError(f"image {images[0][1].get('name')!r} {image.shape} does not match labels {shape}")
        intensities = image.reshape((len(labels), *labels.shape[1:], -1))
    else:
        intensities = np.zeros((*labels.shape, 0), np.float32)  # no image: no intensity columns
    three_d = len(labels) > 1 and spans_planes(labels)
    scale = tuple(float(step) for step in meta.get("scale", ()))[-(3 if three_d else 2) :] or None
    measurements = Measurements(scale, _unit(meta), stack=len(labels) > 1, dims=3 if three_d else 2)
    if three_d:
        measurements.add(labels, intensities)
    else:
        for z, (plane, values) in enumerate(zip(labels, intensities)):
            measurements.add(plane, values, 0, z)
    return [str(measurements.write(path))]
