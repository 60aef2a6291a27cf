"""Tiled prediction of volumes (C, Z, Y, X): 3-D tiles cut, run and stitched on the model's device, slab by slab.

The 2-D engine's geometry, one axis at a time (`unetseg.inference.tiling`): each axis has its
own tile size, overlap, mirrored padding and normalised blend weights, and a tile's weight is
the outer product of its axes' weights, so the blends and the exactness of `center` carry over
to 3-D unchanged. Layers of tiles along Z are processed in slabs; each finished slab of
probabilities is handed out and the input is read slab by slab, so a volume needs memory in
proportion to one slab (tile depth x Y x X), not to its size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.inference.engine import (
    DEFAULT,
    _band_tensor,
    _dihedral_views,
    _merge_dihedral,
    _plan_axis,
    _take,
    autocast_dtype,
    grow_sum,
    pinned_transfer,
    select_device,
    to_host,
)
from unetseg.inference.fold import inference_copy
from unetseg.inference.tiling import TilingConfig, check_tiling

__all__ = ["iter_predict_slabs", "per_axis", "predict_volume_tiled"]


def per_axis(value: int | Sequence[int], name: str, axes: int = 3) -> tuple[int, ...]:
    """An int for every axis, or one value per axis (Z, Y, X); ValueError naming the option otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * axes
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(values) != axes:
        raise ValueError(f"{name} must be an integer or {axes} integers (Z, Y, X), got {value!r}")
    return values


class _SlabPredictor:
    """Runs the model on the 3-D tiles of one slab and stitches them into weighted probabilities."""

    def __init__(self, model, plans, tiles, batch_size, tta, device, dtype):
        self.model, self.plans, self.tiles, self.batch_size = model, plans, tiles, batch_size
        self.tta, self.device, self.dtype = tta, device, dtype
        self.weights = [torch.from_numpy(plan.weights).to(device) for plan in plans]

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K, tz, ty, tx), float32, of a batch of tiles (N, C, tz, ty, tx)."""
        inputs = _dihedral_views(tiles) if self.tta else tiles  # in-plane flips and quarter turns only
        precision = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with precision:
            logits = self.model(inputs)
        if logits.ndim != 5 or logits.shape[0] != inputs.shape[0] or logits.shape[2:] != inputs.shape[2:]:
            raise ValueError(
                f"the model must return logits (N, classes, {', '.join(map(str, self.tiles))}) for tiles "
                f"{tuple(inputs.shape)}; it returned {tuple(logits.shape)} (is it a 3-D model?)"
            )
        logits = logits.float()
        probs = logits.sigmoid_() if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        return _merge_dihedral(probs) if self.tta else probs

    @torch.inference_mode()
    def __call__(self, volume, normalize, layers: range, carry: torch.Tensor | None) -> torch.Tensor:
        """Weighted sum (K, planes, padded Y, padded X) of the tiles in `layers`, `carry` added at the top."""
        depth, rows, cols = self.plans
        size_z, size_y, size_x = self.tiles
        top = int(depth.starts[layers.start])
        bottom = int(depth.starts[layers.stop - 1]) + size_z
        source = depth.source_index[top:bottom]
        low, high = int(source.min()), int(source.max()) + 1
        slab = volume[:, low:high]
        slab = _band_tensor(normalize(slab) if normalize is not None else slab, self.device)  # (C, planes, Y, X)
        inner = max(top, depth.before) - top, min(bottom, depth.before + depth.length) - top
        slab = _take(slab, 1, source - low, *inner)
        slab = _take(slab, 2, rows.source_index, rows.before, rows.before + rows.length)
        slab = _take(slab, 3, cols.source_index, cols.before, cols.before + cols.length)

        tiles = list(itertools.product(layers, range(len(rows.starts)), range(len(cols.starts))))
        total = carry
        for first in range(0, len(tiles), self.batch_size):
            batch = tiles[first : first + self.batch_size]
            corners = [(int(depth.starts[k]) - top, int(rows.starts[i]), int(cols.starts[j])) for k, i, j in batch]
            probs = self.forward(
                torch.stack([slab[:, z : z + size_z, y : y + size_y, x : x + size_x] for z, y, x in corners])
            )
            if total is None or total.shape[1] < bottom - top:
                shape = (probs.shape[1], bottom - top, self.plans[1].padded_length, self.plans[2].padded_length)
                total = grow_sum(total, shape, self.device)
            for tile_probs, (k, i, j), (z, y, x) in zip(probs, batch, corners):
                window = self.weights[0][k][:, None, None] * self.weights[1][i][None, :, None]
                window = window * self.weights[2][j][None, None, :]  # separable blend weights
                total[:, z : z + size_z, y : y + size_y, x : x + size_x].addcmul_(tile_probs, window)
        return total


def iter_predict_slabs(
    model: nn.Module,
    volume: Any,
    *,
    tile_size: int | Sequence[int] = (16, 128, 128),
    overlap: int | Sequence[int] = (4, 32, 32),
    batch_size: int = DEFAULT.batch_size,
    blend: str = DEFAULT.blend,
    pad_mode: str = DEFAULT.pad_mode,
    tta: bool = DEFAULT.tta,
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
        _plan_axis(length, size, margin, blend, pad_mode) for length, size, margin in zip(shape[1:], tiles, overlaps)
    ]
    was_training = model.training
    # Channels-last and BatchNorm folding are 2-D layouts: a 3-D network runs as it is (in eval mode).
    network = inference_copy(model, channels_last=False, compile=compile)
    predictor = _SlabPredictor(network, plans, tiles, batch_size, tta, device, autocast_dtype(device, amp))
    pinned = pinned_transfer(device)
    depth, length = plans[0], shape[1]
    layers_per_slab = max(1, math.ceil(batch_size / (len(plans[1].starts) * len(plans[2].starts))))
    layer_count = len(depth.starts)
    try:
        carry = None
        for first in range(0, layer_count, layers_per_slab):
            layers = range(first, min(first + layers_per_slab, layer_count))
            top = int(depth.starts[first])
            total = predictor(volume, normalize, layers, carry)
            # Planes above the next slab's first tile get no more contributions: they are final.
            done = int(depth.starts[layers.stop]) - top if layers.stop < layer_count else total.shape[1]
            carry = total[:, done:].clone()
            start, stop = max(top - depth.before, 0), min(top + done - depth.before, length)
            if start < stop:
                offset = depth.before - top
                probs = total[
                    :,
                    start + offset : stop + offset,
                    plans[1].before : plans[1].before + shape[2],
                    plans[2].before : plans[2].before + shape[3],
                ]
                if band_transform is not None:
                    with torch.inference_mode():
                        probs = band_transform(probs)
                yield start, stop, to_host(probs, pinned)  # `total` is never written again: a view is safe
    finally:
        model.train(was_training)


def predict_volume_tiled(model: nn.Module, volume: Any, *, out: Any = None, **options) -> np.ndarray:
    """Predict a whole (C, Z, Y, X) volume tile by tile; returns probabilities (classes, Z, Y, X), float32.

    Takes the arguments of `iter_predict_slabs`; `out` is a (classes, Z, Y, X) array written
    slab by slab and returned (None allocates one).
    """
    for start, stop, probs in iter_predict_slabs(model, volume, **options):
        expected = (probs.shape[0], *tuple(volume.shape)[1:])
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"out must have shape {expected} (classes, Z, Y, X); got {tuple(out.shape)}")
        out[:, start:stop] = probs
    return out
