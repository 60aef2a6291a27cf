"""Sample data: the embedded synthetic nuclei (`unetseg.synthetic`), generated on the spot, with their truth."""

from __future__ import annotations

import numpy as np

from unetseg.synthetic import VOLUME_SHAPE, VOLUME_SPACING, nuclei_image, nuclei_volume

__all__ = ["nuclei", "nuclei_volume_sample"]

SEED = 0


def nuclei() -> list[tuple]:
    """A 256 x 256 16-bit image of touching synthetic nuclei and their instance labels ("truth")."""
    image, labels = nuclei_image(np.random.default_rng(SEED), (256, 256))
    return [
        ((image * 4095).round().astype(np.uint16), {"name": "nuclei"}, "image"),
        (labels, {"name": "nuclei truth", "visible": False}, "labels"),
    ]


def nuclei_volume_sample() -> list[tuple]:
    """A synthetic nuclei volume (Z, Y, X) with thick slices, its voxel size (microns) as the layers' scale."""
    image, labels = nuclei_volume(np.random.default_rng(SEED), VOLUME_SHAPE, VOLUME_SPACING)
    scale = tuple(float(step) for step in VOLUME_SPACING)
    return [
        ((image * 4095).round().astype(np.uint16), {"name": "nuclei volume", "scale": scale}, "image"),
        (labels, {"name": "nuclei volume truth", "scale": scale, "visible": False}, "labels"),
    ]
