"""From probabilities to masks and instance labels (thresholds, seeds, watershed).

The settings of `to_labels` that a model can store are `unetseg.spec.POSTPROCESS_DEFAULTS`;
`unetseg.spec.label_settings` merges the defaults, the stored values and the user's overrides.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label as connected_components
from skimage.segmentation import watershed

from unetseg.spec import foreground_probability


def to_mask(probs: np.ndarray | torch.Tensor, threshold: float = 0.5, targets: str | None = None):
    """(classes, ...) probabilities -> uint8 mask (...), a numpy array or a tensor on the probabilities' device
    (4x fewer bytes to copy to the host): 0/255 foreground for one class and for the instance targets
    "boundary" and "distance", the argmax class index for several classes."""
    instance = targets in ("boundary", "distance")
    tensor = isinstance(probs, torch.Tensor)
    if probs.shape[0] == 1 or instance:
        above = foreground_probability(probs, targets if instance else "foreground") > threshold
        return above.to(torch.uint8).mul_(255) if tensor else above.astype(np.uint8) * np.uint8(255)
    index = probs.argmax(0)
    return index.to(torch.uint8) if tensor else index.astype(np.uint8)


def to_labels(
    probs: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 15,
    min_distance: int = 4,
    seed_threshold: float | None = None,
    spacing: tuple[float, ...] | None = None,
) -> np.ndarray:
    """(classes, H, W) or (classes, Z, Y, X) probabilities -> instance labels (H, W) or (Z, Y, X), uint16 or
    uint32 when needed.

    One class (foreground): threshold, then a watershed of the distance transform from its
    maxima splits touching objects (the classic Otsu-and-watershed recipe, on a learnt mask).
    Three classes (background, interior, edge, as `targets: boundary` trains): interiors are
    the seeds, and a watershed on the interior probability grows them into the foreground.
    Four classes (background, interior, edge, centre, as `targets: distance` trains): centres
    (the inner half of each object by distance to its boundary) are the seeds, and the
    watershed runs on the expected distance level (interior counts half, centre fully).
    Objects smaller than `min_size` pixels are removed and labels renumbered 1..n.
    `seed_threshold` (default: `threshold`) is the seed class probability that makes a seed.
    `spacing` (one value per axis, e.g. voxel size (Z, Y, X)) makes the distance transform and
    the peak neighbourhood physical, so thick slices are not taken for thin ones; `min_distance`
    is then counted in the finest axis's pixels. Volumes use face connectivity, as images do.
    """
    classes = probs.shape[0]
    if classes in (3, 4):
        foreground = foreground_probability(probs, "boundary" if classes == 3 else "distance") > threshold
        seed_threshold = threshold if seed_threshold is None else seed_threshold
        seed_probability = probs[1] if classes == 3 else probs[3]
        relief = probs[1] if classes == 3 else probs[3] + 0.5 * probs[1]
        seeds = connected_components((seed_probability > seed_threshold) & foreground, connectivity=1)
        seeds = remove_small(seeds, max(1, min_size // 3))
        labels = watershed(-relief, markers=seeds, mask=foreground)
    elif classes == 1:
        foreground = probs[0] > threshold
        distance = ndimage.distance_transform_edt(foreground, sampling=spacing)
        # Maxima are looked for in each component alone (skimage loops over them); a component under
        # min_size pixels only makes objects that are removed below, so it is left out of that loop.
        peaks = peak_local_max(
            distance,
            min_distance=min_distance,
            footprint=peak_footprint(min_distance, spacing),
            labels=remove_small(connected_components(foreground), min_size),
            exclude_border=False,
        )
        markers = np.zeros(foreground.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-distance, markers=markers, mask=foreground)
    else:
        raise ValueError(
            "instance labels need 1 (foreground), 3 (background/interior/edge) or 4 (and centre) classes, "
            f"got {classes}"
        )
    labels = remove_small(labels, min_size)
    return labels.astype(np.uint16 if labels.max() < 2**16 else np.uint32)


def peak_footprint(min_distance: int, spacing: tuple[float, ...] | None) -> np.ndarray | None:
    """The box in which a distance maximum must be the largest: `min_distance` pixels of the finest axis,
    fewer along coarser axes; None (skimage's square of side 2 min_distance + 1) without spacing."""
    if spacing is None:
        return None
    finest = min(spacing)
    return np.ones([2 * max(1, round(min_distance * finest / step)) + 1 for step in spacing], dtype=bool)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop labelled objects of fewer than `min_size` pixels and renumber the rest 1..n."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    lookup = np.zeros(len(sizes), dtype=np.uint32)  # not int64: a block of a volume holds tens of M voxels
    lookup[keep] = np.arange(1, keep.sum() + 1)
    return lookup[labels]
