"""Tiled prediction of volumes (C, Z, Y, X): 3-D tiles cut, run and stitched on the model's device, slab by slab.

The 2-D engine's geometry, one axis at a time (`unetseg.inference.tiling`): each axis has its
own tile size, overlap, mirrored padding and normalised blend weights, and a tile's weight is
the outer product of its axes' weights, so the blends and the exactness of `center` carry over
to 3-D unchanged. Layers of tiles along Z are processed in slabs; each finished slab of
probabilities is handed out and the input is read slab by slab, so a volume needs memory in
proportion to one slab (tile depth x Y x X), not to its size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from unetseg.inference.engine import iter_predict, iter_predict_bands, per_axis

__all__ = ["VolumeTiling", "iter_predict_slabs", "per_axis", "predict_tiled", "predict_volume_tiled", "spatial_dims"]


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


def spatial_dims(model: nn.Module) -> int:
    """3 for a volumetric network (`UNet(spatial_dims=3)`, or any with 3-D convolution weights), else 2."""
    declared = getattr(model, "spatial_dims", None)
    if declared is not None:
        return int(declared)
    return 3 if any(parameter.ndim == 5 for parameter in model.parameters()) else 2


def iter_predict_slabs(model: nn.Module, volume: Any, **options) -> Iterator[tuple[int, int, np.ndarray]]:
    """`iter_predict` of a volume (C, Z, Y, X): yields (z_start, z_stop, probs (classes, planes, Y, X)).

    Tile size and overlap default to `VolumeTiling`'s (16, 128, 128) and (4, 32, 32).
    """
    shape = tuple(volume.shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"volume must have shape (C, Z, Y, X) with every size >= 1; got shape {shape}")
    defaults = VolumeTiling()
    options = {"tile_size": defaults.tile_size, "overlap": defaults.overlap, **options}
    return iter_predict(model, volume, **options)


def predict_volume_tiled(model: nn.Module, volume: Any, *, out: Any = None, **options) -> np.ndarray:
    """Predict a whole (C, Z, Y, X) volume tile by tile; returns probabilities (classes, Z, Y, X), float32.

    Takes the arguments of `iter_predict_slabs`; `out` is a (classes, Z, Y, X) array written
    slab by slab and returned (None allocates one).
    """
    return _gather(iter_predict_slabs(model, volume, **options), tuple(volume.shape)[1:], out, "(classes, Z, Y, X)")


def predict_tiled(model: nn.Module, image: Any, *, out: Any = None, **options) -> np.ndarray:
    """Predict a whole (C, H, W) image tile by tile; returns probabilities (classes, H, W), float32.

    Takes the arguments of `unetseg.inference.engine.iter_predict_bands`, plus `out`: a (classes,
    H, W) array written band by band and returned, e.g. a `tifffile.memmap` for images too large
    for memory; None allocates one. A volume (C, Z, Y, X) with a 3-D model (3-D convolution
    weights) is predicted in 3-D tiles (`predict_volume_tiled`); tile_size and overlap may then
    give one value per axis (Z, Y, X).
    """
    if len(image.shape) == 4 and spatial_dims(model) == 3:
        return predict_volume_tiled(model, image, out=out, **options)
    return _gather(iter_predict_bands(model, image, **options), tuple(image.shape)[1:], out, "(classes, H, W)")


def _gather(blocks, spatial: tuple[int, ...], out: Any, axes: str) -> np.ndarray:
    """Write blocks (start, stop, probs) along the first spatial axis into `out` (allocated on the first block)."""
    for start, stop, probs in blocks:
        expected = (probs.shape[0], *spatial)
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"out must have shape {expected} {axes}; got {tuple(out.shape)}")
        out[:, start:stop] = probs
    return out
