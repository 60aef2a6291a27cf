"""Training targets from masks: foreground, boundary (background / interior / edge) or class indices,
and the U-Net paper's border weight map."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

from unetseg.spec import TARGETS

__all__ = ["TARGETS", "border_weight_map", "make_target"]


def make_target(labels: np.ndarray, targets: str) -> np.ndarray:
    """Training target (H, W) int64 from a mask: foreground 0/1, boundary 0/1/2, distance 0/1/2/3
    (3: the centre of each object, where its distance to its own edge is over half its maximum),
    or class indices."""
    if targets == "foreground":
        return (labels > 0).astype(np.int64)
    if targets in ("boundary", "distance"):
        target = (labels > 0).astype(np.int64)
        edges = find_boundaries(labels, mode="inner")
        target[edges] = 2  # edges of every nucleus, also where two touch
        if targets == "distance":
            target[centres(labels, edges)] = 3
        return target
    return labels.astype(np.int64)


def centres(labels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Pixels of each object farther than half its largest distance from its edge: one blob per object,
    apart from its neighbours, which is what seeds a watershed (DSB2018 winners' "eroded masks")."""
    inside = (labels > 0) & ~edges
    distance = ndimage.distance_transform_edt(inside)
    ids = np.unique(labels[inside])
    if not len(ids):
        return np.zeros(labels.shape, dtype=bool)
    largest = np.zeros(int(labels.max()) + 1, dtype=np.float64)
    largest[ids] = ndimage.maximum(distance, labels, ids)
    return inside & (distance > 0.5 * largest[labels])


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
