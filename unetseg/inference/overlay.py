"""Pictures of predictions: masks and labels as PNG, and outlines drawn on the input for quality control
(as Cellpose's --save_png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from skimage import io as skio
from skimage.segmentation import find_boundaries

from unetseg.io.files import atomic_output, image_stem
from unetseg.io.images import to_channels
from unetseg.io.normalize import Normalization
from unetseg.io.source import native

OVERLAY_SUFFIX = "_overlay.png"  # <stem>_overlay.png beside an output: a picture, not a prediction
OVERLAY_MAX_SIDE = 4096  # larger inputs are shown every k-th pixel: a picture to look at, not a measurement
OUTLINE_COLOUR = (255, 255, 0)  # yellow reads on grey, fluorescence and brightfield alike


def png_array(array: np.ndarray, path: str | Path) -> np.ndarray:
    """An output as PNG can hold it: 2D uint8 or uint16 (labels up to 65535); ValueError naming the file otherwise."""
    if array.ndim != 2:
        raise ValueError(f"{path}: PNG holds one 2D plane; this output is {array.shape} (write .tif instead)")
    if array.dtype.kind in "ui" and array.max(initial=0) < 2**16:
        return array.astype(np.uint8 if array.max(initial=0) < 256 and array.dtype.itemsize == 1 else np.uint16)
    raise ValueError(f"{path}: PNG holds 8/16-bit masks and labels, not {array.dtype} up to {array.max()}; write .tif")


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a 2D 8/16-bit array as PNG, atomically."""
    array = png_array(array, path)
    with atomic_output(path, suffix=".tmp.png") as temporary:
        skio.imsave(temporary, array, check_contrast=False)
    return Path(path)


def display_rgb(plane: Any, normalization: Normalization = Normalization()) -> np.ndarray:
    """An input plane (H, W[, C]) as uint8 RGB (H, W, 3), percentile-normalised for display."""
    image = to_channels(np.asarray(native(plane)), 3)  # (3, H, W)
    image = normalization.apply(image, normalization.range(image))
    return np.moveaxis((image * 255).round().astype(np.uint8), 0, -1)


def outline_labels(output: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """Integer regions (H, W) to outline: labels and masks as they are, probabilities by threshold."""
    if kind == "prob":
        return (output > threshold).astype(np.uint8) if output.ndim == 2 else output.argmax(axis=0)
    return output


def overlay(plane: Any, output: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """The input plane (H, W[, C]) in RGB with the outlines of the predicted objects or classes in yellow."""
    step = max(1, -(-max(plane.shape[0], plane.shape[1]) // OVERLAY_MAX_SIDE))
    picture = display_rgb(plane[::step, ::step])
    regions = outline_labels(np.asarray(output[..., ::step, ::step]), kind, threshold)
    picture[find_boundaries(regions, mode="inner")] = OUTLINE_COLOUR
    return picture


def write_overlay(path: str | Path, plane: Any, output: np.ndarray, kind: str, threshold: float = 0.5) -> Path:
    """Write `overlay(...)` as an RGB PNG, atomically."""
    picture = overlay(plane, output, kind, threshold)
    with atomic_output(path, suffix=".tmp.png") as temporary:
        skio.imsave(temporary, picture, check_contrast=False)
    return Path(path)


def overlay_path(target: str | Path) -> Path:
    """Where the overlay of an output goes: next to it, `<stem>_overlay.png` (`ct.nii.gz` -> `ct_overlay.png`)."""
    target = Path(target)
    return target.with_name(image_stem(target) + OVERLAY_SUFFIX)
