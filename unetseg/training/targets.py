"""Training targets from masks: foreground, boundary (background / interior / edge) or class indices,
and the U-Net paper's border weight map."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

from unetseg.spec import TARGETS

__all__ = ["TARGETS", "border_weight_map", "make_target"]


def make_target(labels: np.ndarray, targets: str) -> np.ndarray:
    """Training target (H, W) int64 from a mask: foreground 0/1, boundary 0/1/2, or class indices."""
    if targets == "foreground":
        return (labels > 0).astype(np.int64)
    if targets == "boundary":
        target = (labels > 0).astype(np.int64)
        target[find_boundaries(labels, mode="inner")] = 2  # edges of every nucleus, also where two touch
        return target
    return labels.astype(np.int64)


def border_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Ronneberger et al. (2015), eq. 2: w = 1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background.

    d1 and d2 are the distances to the nearest and second-nearest instance, so the thin
    background gaps between touching objects weigh most. Class balancing (w_c) is left to
    the Dice term. Returns float32 (H, W); all ones with fewer than two instances.
    """
    ids = np.unique(labels)
    ids = ids[ids > 0]
    weights = np.ones(labels.shape, dtype=np.float32)
    if len(ids) < 2:
        return weights
    nearest = np.full(labels.shape, np.inf, dtype=np.float32)
    second = np.full(labels.shape, np.inf, dtype=np.float32)
    for label in ids:
        distance = ndimage.distance_transform_edt(labels != label).astype(np.float32)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    background = labels == 0
    weights[background] += w0 * np.exp(-((nearest[background] + second[background]) ** 2) / (2 * sigma**2))
    return weights
