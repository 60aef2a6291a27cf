"""Tiled prediction of images (C, H, W) and volumes (C, Z, Y, X): tiles cut, run and stitched on the model's
device, block by block along the first spatial axis (`iter_predict`).

Rows of tiles (layers of 3-D tiles) are processed in bands (slabs); each finished band of
probabilities is handed out, so memory grows with one band (one slab), not with the image
(volume). The input is read band by band too, from anything that slices like an array (numpy,
`tifffile.memmap`, torch, zarr). Every axis has its own tile size, overlap, padding and blend
weights (`plan_axis`), and a tile's weight is the outer product of its axes' weights, so one
code path serves 2-D and 3-D. Hand-written, not MONAI's `sliding_window_inference`: it needs the
whole input and output in memory, and its Gaussian window is one N-D array where ours is
separable (benchmarks/bench_inference.py measures both).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.inference.fold import inference_copy, memory_format_of
from unetseg.inference.tiling import TilingConfig, axis_weights, pad_indices, padding, tile_starts
from unetseg.runtime.precision import autocast_dtype, channels_last
from unetseg.runtime.profiling import stage

__all__ = ["autocast_dtype", "iter_predict", "iter_predict_bands", "per_axis", "select_device", "to_host"]

DEFAULT = TilingConfig()


def select_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """The device tiles are run and stitched on: `device`, or the model's parameters' device (CPU if it has none).

    Raises ValueError when `device` differs from where the model's parameters are: the
    model is the caller's and is never moved here.
    """
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    model_device = tensor.device if tensor is not None else None
    if device is None:
        return model_device if model_device is not None else torch.device("cpu")
    device = torch.device(device)
    if model_device is not None and not _same_device(device, model_device):
        raise ValueError(
            f"device {device} differs from the model's device {model_device}; move the model with model.to(device)"
        )
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """True when two devices name the same hardware ("cuda" and "cuda:0" alike)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one image axis: padding, tile starts, normalised blend weights, source index map."""

    length: int
    before: int
    padded_length: int
    starts: np.ndarray  # (tiles,) in padded coordinates
    weights: np.ndarray  # (tiles, tile_size)
    source_index: np.ndarray  # (padded_length,) image index of each padded position


def plan_axis(length: int, tile_size: int, overlap: int, blend: str, pad_mode: str) -> AxisPlan:
    """Geometry of one axis from `unetseg.inference.tiling`."""
    before, after = padding(length, tile_size)
    padded_length = before + length + after
    starts = tile_starts(padded_length, tile_size, overlap)
    return AxisPlan(
        length=length,
        before=before,
        padded_length=padded_length,
        starts=starts,
        weights=axis_weights(padded_length, starts, tile_size, blend),
        source_index=pad_indices(length, before, after, pad_mode),
    )


DIHEDRAL_VIEWS = 8  # view k < 4: k quarter turns; k >= 4: a flip of the last axis, then k - 4 quarter turns


def dihedral_view(tiles: torch.Tensor, k: int) -> torch.Tensor:
    """View k (0..7) of (..., T, T) tiles: the flips and quarter turns of their last two axes."""
    return torch.rot90(tiles.flip(-1) if k >= 4 else tiles, k % 4, dims=(-2, -1))


def undo_dihedral_view(outputs: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `dihedral_view(., k)`: outputs of view k turned back to the tiles' orientation."""
    outputs = torch.rot90(outputs, -(k % 4), dims=(-2, -1))
    return outputs.flip(-1) if k >= 4 else outputs


def _dihedral_views(tiles: torch.Tensor) -> torch.Tensor:
    """The 8 flips and quarter turns of (N, C, T, T) tiles, stacked as (8 N, C, T, T)."""
    return torch.cat([dihedral_view(tiles, k) for k in range(DIHEDRAL_VIEWS)])


def _merge_dihedral(probs: torch.Tensor) -> torch.Tensor:
    """Undo `_dihedral_views` on (8 N, K, T, T) outputs and average them to (N, K, T, T)."""
    views = probs.chunk(DIHEDRAL_VIEWS)
    total = torch.zeros_like(views[0])
    for k, view in enumerate(views):
        total += undo_dihedral_view(view, k)
    return total / DIHEDRAL_VIEWS


def _band_tensor(band: Any, device: torch.device) -> torch.Tensor:
    """A (C, rows, W) band of any array type as float32 on `device`."""
    if isinstance(band, torch.Tensor):
        return band.to(device=device, dtype=torch.float32)
    array = np.asarray(band, dtype=np.float32)
    if not array.flags.writeable:  # torch.from_numpy refuses read-only memory (memmap mode "r")
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _take(tensor: torch.Tensor, dim: int, index: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """`tensor.index_select(dim, index)` where index[start:stop] counts up by one: only the padded ends are gathered."""
    if start >= stop:
        return tensor.index_select(dim, torch.from_numpy(index).to(tensor.device))
    pieces = [tensor.narrow(dim, int(index[start]), stop - start)]
    if start > 0:
        pieces.insert(0, tensor.index_select(dim, torch.from_numpy(index[:start]).to(tensor.device)))
    if stop < len(index):
        pieces.append(tensor.index_select(dim, torch.from_numpy(index[stop:]).to(tensor.device)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class BlockPredictor:
    """Runs the model on the tiles of one block and stitches them into weighted probabilities.

    A block is a run of tile rows of an image (a band) or of tile layers of a volume (a slab):
    the first spatial axis is cut into blocks, every other axis is tiled whole. `plans` and
    `tiles` give each spatial axis's geometry and tile size, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        plans: Sequence[AxisPlan],
        tiles: Sequence[int],
        batch_size: int,
        tta: bool,
        device: torch.device,
        dtype: torch.dtype | None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.model, self.plans, self.tiles, self.batch_size = model, tuple(plans), tuple(tiles), batch_size
        self.tta, self.device, self.dtype, self.memory_format = tta, device, dtype, memory_format
        self.weights = [torch.from_numpy(plan.weights).to(device) for plan in plans]

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K, *tile), float32, of a batch of tiles (N, C, *tile)."""
        inputs = _dihedral_views(tiles) if self.tta else tiles  # in-plane flips and quarter turns
        inputs = inputs.contiguous(memory_format=self.memory_format)
        precision = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with (
            precision
        ):  # at most batch_size tiles at a time, TTA's 8 views too: 8x the batch is slower and 8x the memory
            logits = torch.cat([self.model(part) for part in inputs.split(self.batch_size)])
        if logits.ndim != inputs.ndim or logits.shape[0] != inputs.shape[0] or logits.shape[2:] != inputs.shape[2:]:
            hint = " (is it a 3-D model?)" if len(self.tiles) == 3 else ""
            raise ValueError(
                f"the model must return logits (N, classes, {', '.join(map(str, self.tiles))}) for tiles "
                f"{tuple(inputs.shape)}; it returned {tuple(logits.shape)}{hint}"
            )
        logits = logits.float().contiguous()  # accumulate in float32, whatever autocast ran in
        probs = logits.sigmoid_() if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        return _merge_dihedral(probs) if self.tta else probs

    def blend(self, batch: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """(N, *tile) blend weights of the tiles in `batch` (a tile index per axis): the outer product of
        their axes' weights."""
        dims = len(self.tiles)
        total = None
        for axis, (weights, index) in enumerate(zip(self.weights, zip(*batch))):
            shape = [len(batch)] + [1] * dims
            shape[axis + 1] = -1
            axis_weights = weights[list(index)].reshape(shape)
            total = axis_weights if total is None else total * axis_weights
        return total

    def window(self, tile: tuple[int, ...], top: int) -> tuple[slice, ...]:
        """Where `tile` (a tile index per axis) lies in a block's sum whose first row is padded position `top`."""
        starts = [int(plan.starts[index]) for plan, index in zip(self.plans, tile)]
        starts[0] -= top
        return (slice(None), *(slice(start, start + size) for start, size in zip(starts, self.tiles)))

    @torch.inference_mode()
    def __call__(self, source, normalize, block: range, carry: torch.Tensor | None) -> torch.Tensor:
        """Weighted sum (K, block length, *padded other axes) of the tiles whose first-axis index is in
        `block`, `carry` (the previous block's unfinished part) added at the top."""
        first, *others = self.plans
        top = int(first.starts[block.start])
        bottom = int(first.starts[block.stop - 1]) + self.tiles[0]
        index = first.source_index[top:bottom]
        low, high = int(index.min()), int(index.max()) + 1
        with stage("read"):
            data = source[:, low:high]
            if isinstance(data, np.memmap):  # page the band in here, not wherever it is first touched
                data = np.array(data)
        if normalize is not None:
            with stage("normalise"):
                data = normalize(data)
        with stage("tile"):
            data = _band_tensor(data, self.device)
            # Mirrored borders; interior positions are used as read, without a gather.
            inner = max(top, first.before) - top, min(bottom, first.before + first.length) - top
            data = _take(data, 1, index - low, *inner)
            for dim, plan in enumerate(others, start=2):
                data = _take(data, dim, plan.source_index, plan.before, plan.before + plan.length)

        tiles = list(itertools.product(block, *(range(len(plan.starts)) for plan in others)))
        total = carry
        for begin in range(0, len(tiles), self.batch_size):
            batch = tiles[begin : begin + self.batch_size]
            with stage("tile"):
                windows = [self.window(tile, top) for tile in batch]
                batch_tiles = torch.stack([data[window] for window in windows])
            with stage("forward"):
                probs = self.forward(batch_tiles)
            with stage("blend"):
                if total is None or total.shape[1] < bottom - top:
                    shape = (probs.shape[1], bottom - top, *(plan.padded_length for plan in others))
                    total = grow_sum(total, shape, self.device)
                for tile_probs, weight, window in zip(probs, self.blend(batch), windows):
                    total[window].addcmul_(tile_probs, weight)
        return total


def iter_blocks(
    predictor: BlockPredictor,
    source: Any,
    normalize: Callable[[Any], Any] | None,
    band_transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Predict `source` (C, *spatial) block by block along its first spatial axis: yields (start, stop,
    probs) with probs (classes, stop - start, *other axes), in order, every position once."""
    first, *others = predictor.plans
    # Enough tile rows (layers) per block to fill a batch, so narrow images still run full batches.
    per_block = max(1, math.ceil(predictor.batch_size / math.prod(len(plan.starts) for plan in others)))
    count = len(first.starts)
    pinned = pinned_transfer(predictor.device)
    carry = None
    for begin in range(0, count, per_block):
        block = range(begin, min(begin + per_block, count))
        top = int(first.starts[begin])
        total = predictor(source, normalize, block, carry)
        # Positions before the next block's first tile get no more contributions: they are final.
        done = int(first.starts[block.stop]) - top if block.stop < count else total.shape[1]
        with stage("blend"):
            carry = total[:, done:].clone()
        start, stop = max(top - first.before, 0), min(top + done - first.before, first.length)
        if start < stop:
            offset = first.before - top  # block position of source position 0
            crop = (slice(start + offset, stop + offset), *(slice(p.before, p.before + p.length) for p in others))
            probs = total[(slice(None), *crop)]
            if band_transform is not None:
                with torch.inference_mode(), stage("post-process"):
                    probs = band_transform(probs)
            with stage("blend"):
                probs = to_host(probs, pinned)  # `total` is never written again: a view is safe
            yield start, stop, probs


def grow_sum(total: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A zeroed float32 weighted sum of `shape` (classes, rows or planes, ...) holding `total`, the part
    carried over from the previous band or slab, at the top."""
    grown = torch.zeros(shape, dtype=torch.float32, device=device)
    if total is not None:
        if total.shape[0] != shape[0]:
            raise ValueError(f"the model returned {shape[0]} classes for one band and {total.shape[0]} for another")
        grown[:, : total.shape[1]] = total
    return grown


def per_axis(value: int | Sequence[int], name: str, axes: int = 3) -> tuple[int, ...]:
    """An int for every axis, or one value per axis (Z, Y, X / Y, X); ValueError naming the option otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * axes
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(values) != axes:
        names = "(Z, Y, X)" if axes == 3 else "(Y, X)"
        raise ValueError(f"{name} must be an integer or {axes} integers {names}, got {value!r}")
    return values


def iter_predict(
    model: nn.Module,
    array: Any,
    *,
    tile_size: int | Sequence[int] = DEFAULT.tile_size,
    overlap: int | Sequence[int] = DEFAULT.overlap,
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
    """Predict an image (C, H, W) or a volume (C, Z, Y, X) block by block along its first spatial axis: yields
    (start, stop, probs) with probs (classes, stop - start, ...) float32.

    Blocks (bands of rows, slabs of planes) come in order, cover every position once, and only
    one block of input and output is held at a time, so a huge image needs memory in proportion
    to its width, a volume to one slab.

    Args:
        model: an nn.Module returning logits (N, classes, ...) for (N, C, ...) tiles. It runs as a
            copy in eval mode with BatchNorm folded into its convolutions (2-D and 3-D), channels-last
            (3-D: channels_last_3d) on CPU and CUDA (`unetseg.inference.fold.inference_copy`); the
            model itself is not changed. One output channel gives sigmoid probabilities, several a
            softmax.
        array: (C, H, W) or (C, Z, Y, X) of any size, anything sliced as `array[:, start:stop]` (numpy,
            `numpy.memmap`/`tifffile.memmap`, torch tensor, zarr, `VolumeChannels`).
        tile_size, overlap: an int for every axis, or one per axis: thick-slice volumes want
            short tiles along Z. The rules of `TilingConfig` hold per axis (border context
            overlap // 2; `center` is exact when the receptive field radius fits in it).
        batch_size, blend, pad_mode, tta, amp, compile: see `TilingConfig`; tta averages the 8
            in-plane flips and quarter turns (tiles square in the last two axes).
        normalize: applied to each raw block (C, rows, ...) before tiling, e.g.
            `lambda band: Normalization().apply(band, value_range)` with a range computed once
            for the whole image; None takes the input as already normalised.
        device: where tiles are run and stitched; None means the model's device.
        band_transform: applied on the device to each finished block of probabilities before it
            is copied to the host, e.g. a threshold to a uint8 mask, so only the smallest type
            crosses to the host; blocks are then what it returns.
    """
    shape = tuple(array.shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"array must have shape (C, H, W) or (C, Z, Y, X), every size >= 1; got shape {shape}")
    dims = len(shape) - 1
    tiles, overlaps = per_axis(tile_size, "tile_size", dims), per_axis(overlap, "overlap", dims)
    for size, margin in zip(tiles, overlaps):
        TilingConfig(size, margin, batch_size, blend, pad_mode, tta, amp, compile)  # checks every setting
    if tta and tiles[-1] != tiles[-2]:
        raise ValueError(f"tta turns tiles a quarter: needs tile_size square in Y and X, got {tiles}")
    device = select_device(model, device)
    plans = [
        plan_axis(length, size, margin, blend, pad_mode) for length, size, margin in zip(shape[1:], tiles, overlaps)
    ]
    layout = channels_last(device)
    was_training = model.training
    network = inference_copy(model, channels_last=layout, compile=compile)
    converted = network is not model  # a network without conv weights (ONNX Runtime) takes tiles as they are
    memory_format = memory_format_of(network) if converted and layout else torch.contiguous_format
    dtype = autocast_dtype(device, amp)
    predictor = BlockPredictor(network, plans, tiles, batch_size, tta, device, dtype, memory_format)
    try:
        yield from iter_blocks(predictor, array, normalize, band_transform)
    finally:
        model.train(was_training)


def iter_predict_bands(model: nn.Module, image: Any, **options) -> Iterator[tuple[int, int, np.ndarray]]:
    """`iter_predict` of an image (C, H, W): yields (row_start, row_stop, probs (classes, rows, W))."""
    shape = tuple(image.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image must have shape (C, H, W) with C, H, W >= 1; got shape {shape}")
    return iter_predict(model, image, **options)


def pinned_transfer(device: torch.device) -> bool:
    """True when bands should come back through page-locked host memory: from CUDA, where it is twice as fast."""
    return device.type == "cuda"


def to_host(tensor: torch.Tensor, pinned: bool = False) -> np.ndarray:
    """A tensor as a numpy array on the host: a view of CPU tensors, else a copy (through pinned memory if `pinned`).

    Pinned memory is only available with CUDA; without it the same code path copies through
    ordinary memory, so it is exercised on any machine.
    """
    if tensor.device.type == "cpu" and not pinned:
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned and torch.cuda.is_available())
    host.copy_(tensor, non_blocking=host.is_pinned())
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()  # the non-blocking copy must land before numpy reads
    return host.numpy()
