"""Training targets from masks: foreground, boundary (background / interior / edge) or class indices,
and the U-Net paper's border weight map. Both are computed once per image (see `TileDataset`) and
cropped and warped with it, as the U-Net paper precomputes its weight maps."""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

from unetseg.spec import TARGETS

__all__ = ["TARGETS", "border_weight_map", "centres", "compact_target", "make_target", "weight_radius"]

# Largest error the bounded weight map may make against the unbounded formula (weights are >= 1).
WEIGHT_TOLERANCE = 1e-6


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


def compact_target(target: np.ndarray) -> np.ndarray:
    """A target in the smallest unsigned type that holds it (uint8 for up to 256 classes): kept per image, in memory."""
    return target.astype(np.uint8) if target.max(initial=0) < 256 else target.astype(np.int32)


def weight_radius(w0: float, sigma: float, tolerance: float = WEIGHT_TOLERANCE) -> int:
    """Distance beyond which an instance cannot change the weight map by more than `tolerance`.

    A pixel whose nearest or second-nearest instance is farther than R has d1 + d2 > R, so its
    weight lies within w0 * exp(-R^2 / (2 sigma^2)) of 1; R makes that at most `tolerance`.
    """
    if w0 <= tolerance:
        return 0
    return math.ceil(sigma * math.sqrt(2.0 * math.log(w0 / tolerance)))


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

    Each instance's distance transform covers only its bounding box grown by `weight_radius`
    (about 6 sigma): farther away it cannot change the map by more than WEIGHT_TOLERANCE, so
    the cost grows with the instances' area, not with their number times the image's.
    """
    weights = np.ones(labels.shape, dtype=np.float32)
    boxes = ndimage.find_objects(labels) if labels.any() else []  # boxes[i]: label i + 1, None if absent
    present = [(label, box) for label, box in enumerate(boxes, start=1) if box is not None]
    if len(present) < 2:
        return weights
    radius = weight_radius(w0, sigma)
    nearest = np.full(labels.shape, np.inf, dtype=np.float32)
    second = np.full(labels.shape, np.inf, dtype=np.float32)
    for label, box in present:
        window = tuple(
            slice(max(0, axis.start - radius), min(size, axis.stop + radius)) for axis, size in zip(box, labels.shape)
        )
        # The instance lies wholly inside its window, so distances there are exact. OpenCV's exact
        # Euclidean transform (DIST_MASK_PRECISE) is about twice as fast as scipy's.
        outside = (labels[window] != label).view(np.uint8)
        distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        near, far = nearest[window], second[window]
        np.minimum(far, np.maximum(near, distance), out=far)
        np.minimum(near, distance, out=near)
    background = labels == 0
    weights[background] += w0 * np.exp(-((nearest[background] + second[background]) ** 2) / (2 * sigma**2))
    return weights
