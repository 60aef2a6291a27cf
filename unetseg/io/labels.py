"""Instance labels from annotation masks: a label image as it is, a binary mask split into components."""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components

__all__ = ["CONNECTIVITY", "as_instances"]

CONNECTIVITY = 1  # 4-neighbours: splits binary masks at one-pixel diagonal gaps (see as_instances)


def as_instances(mask: np.ndarray, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """Instance labels of a mask: a label image is returned as it is, a binary mask is split into components.

    A mask is binary when it holds at most one non-zero value (0/1, 0/255, bool). Its connected
    components are labelled 1..n with `skimage.measure.label`. The default connectivity 1
    (4-neighbours in 2D) keeps cells apart that are separated by a one-pixel, diagonally
    connected membrane or gap; pass `connectivity=mask.ndim` for 8-neighbours.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "uib":
        raise ValueError(f"a mask must hold integers or booleans, got dtype {mask.dtype}")
    if mask.dtype.kind == "i" and mask.size and mask.min() < 0:
        raise ValueError("a mask must not hold negative labels")
    foreground = mask[mask != 0]
    is_binary = foreground.size == 0 or bool(np.all(foreground == foreground[0]))
    if not is_binary:
        return mask
    return connected_components(mask != 0, connectivity=connectivity)
