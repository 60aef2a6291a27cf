"""Image types by simple colour and intensity statistics: fluorescence, grey brightfield, stained tissue.

Training samples the groups evenly (or tempered, see `cluster_weights`) so that rare image types
are not drowned by the common one, and evaluation reports scores per group. The groups come
from two numbers per image (brightness, colourfulness) and two cut-offs, so they need no
annotation and no file names. (k-means on the same two numbers, tried on DSB2018, split the
fluorescence images in two by brightness and merged the 11 grey brightfield images into the
colour ones: the rare type is what it misses.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Cut-offs between the groups, found on DSB2018 (every image type there falls clearly on one side).
COLOURFUL = 0.04  # mean channel spread, as a fraction of the full range
BRIGHT = 0.4  # mean intensity, as a fraction of the full range


def image_features(image: np.ndarray) -> np.ndarray:
    """(brightness, colourfulness) of a (C, H, W) image, each in [0, 1] of the image's dtype range.

    Brightness is the mean intensity; colourfulness the mean over pixels of the spread between
    the brightest and darkest channel (0 for grey images).
    """
    image = np.asarray(image)
    scale = (
        float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else max(float(image.max()), 1e-6)
    )
    step = max(1, int(np.sqrt(image.shape[-2] * image.shape[-1] / 65536)))  # about 256 x 256 pixels suffice
    pixels = image[:, ::step, ::step].astype(np.float32) / scale
    spread = pixels.max(axis=0) - pixels.min(axis=0) if len(pixels) > 1 else np.zeros(pixels.shape[1:])
    return np.array([pixels.mean(), spread.mean()], dtype=np.float64)


def cluster_name(features: np.ndarray) -> str:
    """A readable name for a group of images from its mean features (rows of `image_features`)."""
    brightness, colour = np.asarray(features, dtype=np.float64).reshape(-1, 2).mean(axis=0)
    if colour > COLOURFUL:
        return "colour (stained)"
    return "grey brightfield" if brightness > BRIGHT else "fluorescence"


def modality_names(features: np.ndarray) -> list[str]:
    """The `cluster_name` of each image by its own features: the groups scores are reported by."""
    return [cluster_name(row) for row in np.asarray(features).reshape(-1, 2)]


def cluster_weights(assigned: Sequence[int], balance: float = 1.0) -> np.ndarray:
    """Probability of drawing each image so that cluster c is drawn in proportion to n_c ** (1 - balance).

    balance 1 samples clusters evenly, 0 samples images evenly (clusters by their size); images
    within a cluster are drawn evenly.
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"modality_balance must be in [0, 1], got {balance!r}")
    assigned = np.asarray(assigned)
    counts = np.bincount(assigned)
    share = np.where(counts > 0, counts.astype(np.float64) ** (1.0 - balance), 0.0)
    share /= share.sum()
    weights = share[assigned] / counts[assigned]
    return weights / weights.sum()
