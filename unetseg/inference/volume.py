"""Tiled prediction of volumes (C, Z, Y, X): 3-D tiles cut, run and stitched on the model's device, slab by slab.

The 2-D engine's geometry, one axis at a time (`unetseg.inference.tiling`): each axis has its
own tile size, overlap, mirrored padding and normalised blend weights, and a tile's weight is
the outer product of its axes' weights, so the blends and the exactness of `center` carry over
to 3-D unchanged. Layers of tiles along Z are processed in slabs; each finished slab of
probabilities is handed out and the input is read slab by slab, so a volume needs memory in
proportion to one slab (tile depth x Y x X), not to its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.inference.engine import (
    DEFAULT,
    BlockPredictor,
    autocast_dtype,
    iter_blocks,
    iter_predict_bands,
    plan_axis,
    select_device,
)
from unetseg.inference.fold import inference_copy
from unetseg.inference.tiling import TilingConfig, check_tiling

__all__ = ["VolumeTiling", "iter_predict_slabs", "per_axis", "predict_tiled", "predict_volume_tiled", "spatial_dims"]


def per_axis(value: int | Sequence[int], name: str, axes: int = 3) -> tuple[int, ...]:
    """An int for every axis, or one value per axis (Z, Y, X); ValueError naming the option otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * axes
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(values) != axes:
        raise ValueError(f"{name} must be an integer or {axes} integers (Z, Y, X), got {value!r}")
    return values


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


def iter_predict_slabs(
    model: nn.Module,
    volume: Any,
    *,
    tile_size: int | Sequence[int] = (16, 128, 128),
    overlap: int | Sequence[int] = (4, 32, 32),
    batch_size: int = DEFAULT.batch_size,
    blend: str = DEFAULT.blend,
    pad_mode: str = DEFAULT.pad_mode,
    tta: bool = False,
    normalize: Callable[[Any], Any] | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = DEFAULT.amp,
    compile: bool = DEFAULT.compile,
    band_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Predict a volume slab by slab: yields (z_start, z_stop, probs) with probs (classes, planes, Y, X) float32.

    Slabs come in order and cover every plane once; only one slab of input and output is held
    at a time.

    Args:
        model: a 3-D network returning logits (N, classes, z, y, x) for (N, C, z, y, x); run as
            `unetseg.inference.fold.inference_copy` makes it (eval mode; the model is not changed).
        volume: (C, Z, Y, X), anything sliced as `volume[:, start:stop]` (numpy, memory maps,
            `unetseg.io.volumes.VolumeChannels`).
        tile_size, overlap: an int for every axis, or one per axis (Z, Y, X): thick-slice data
            want short tiles along Z. The rules of `TilingConfig` hold per axis (border context
            overlap // 2; `center` is exact when the receptive field radius fits in it).
        batch_size, blend, pad_mode, amp, compile: as `TilingConfig`.
        tta: average the 8 in-plane flips and quarter turns (needs tiles square in Y, X).
        normalize: applied to each raw slab (C, planes, Y, X) before tiling.
        device: where tiles are run and stitched; None means the model's device.
        band_transform: applied on the device to each finished slab (classes, planes, Y, X)
            before it is copied to the host (e.g. a threshold to a uint8 mask).
    """
    tiles, overlaps = per_axis(tile_size, "tile_size"), per_axis(overlap, "overlap")
    for size, margin in zip(tiles, overlaps):
        check_tiling(size, margin, blend, pad_mode)
    TilingConfig(batch_size=batch_size, blend=blend, pad_mode=pad_mode, tta=tta, amp=amp, compile=compile)
    if tta and tiles[1] != tiles[2]:
        raise ValueError(f"tta turns tiles a quarter: needs tile_size square in Y and X, got {tiles}")
    shape = tuple(volume.shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"volume must have shape (C, Z, Y, X) with every size >= 1; got shape {shape}")
    device = select_device(model, device)
    plans = [
        plan_axis(length, size, margin, blend, pad_mode) for length, size, margin in zip(shape[1:], tiles, overlaps)
    ]
    was_training = model.training
    # BatchNorm is folded into Conv3d as into Conv2d; channels-last stays a 2-D layout here.
    network = inference_copy(model, channels_last=False, compile=compile)
    predictor = BlockPredictor(network, plans, tiles, batch_size, tta, device, autocast_dtype(device, amp))
    try:
        yield from iter_blocks(predictor, volume, normalize, band_transform)
    finally:
        model.train(was_training)


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
