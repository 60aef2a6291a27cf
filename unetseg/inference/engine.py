"""Tiled prediction of whole images: tiles cut, run and stitched on the model's device, band by band.

Rows of tiles are processed in horizontal bands; each finished band of probabilities is handed
out, so memory grows with the image width, not its area. The input is read band by band too,
from anything that slices like a (C, H, W) array (numpy, `tifffile.memmap`, torch, zarr).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.inference.fold import inference_copy
from unetseg.inference.tiling import TilingConfig, axis_weights, pad_indices, padding, tile_starts
from unetseg.precision import autocast_dtype, channels_last

__all__ = ["autocast_dtype", "iter_predict_bands", "predict_tiled", "select_device", "to_host"]

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
class _AxisPlan:
    """Tiling of one image axis: padding, tile starts, normalised blend weights, source index map."""

    length: int
    before: int
    padded_length: int
    starts: np.ndarray  # (tiles,) in padded coordinates
    weights: np.ndarray  # (tiles, tile_size)
    source_index: np.ndarray  # (padded_length,) image index of each padded position


def _plan_axis(length: int, tile_size: int, overlap: int, blend: str, pad_mode: str) -> _AxisPlan:
    """Geometry of one axis from `unetseg.inference.tiling`."""
    before, after = padding(length, tile_size)
    padded_length = before + length + after
    starts = tile_starts(padded_length, tile_size, overlap)
    return _AxisPlan(
        length=length,
        before=before,
        padded_length=padded_length,
        starts=starts,
        weights=axis_weights(padded_length, starts, tile_size, blend),
        source_index=pad_indices(length, before, after, pad_mode),
    )


def _dihedral_views(tiles: torch.Tensor) -> torch.Tensor:
    """The 8 flips and quarter turns of (N, C, T, T) tiles, stacked as (8 N, C, T, T)."""
    flipped = tiles.flip(-1)
    views = [torch.rot90(tiles, k, dims=(-2, -1)) for k in range(4)]
    views += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(views)


def _merge_dihedral(probs: torch.Tensor) -> torch.Tensor:
    """Undo `_dihedral_views` on (8 N, K, T, T) outputs and average them to (N, K, T, T)."""
    views = probs.chunk(8)
    total = torch.zeros_like(views[0])
    for k, view in enumerate(views):
        view = torch.rot90(view, -(k % 4), dims=(-2, -1))
        total += view.flip(-1) if k >= 4 else view
    return total / 8


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


class _BandPredictor:
    """Runs the model on the tiles of one band and stitches them into weighted probabilities."""

    def __init__(
        self,
        model: nn.Module,
        rows: _AxisPlan,
        cols: _AxisPlan,
        tile_size: int,
        batch_size: int,
        tta: bool,
        device: torch.device,
        dtype: torch.dtype | None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.model = model
        self.memory_format = memory_format
        self.rows = rows
        self.cols = cols
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.tta = tta
        self.device = device
        self.dtype = dtype
        self.row_weights = torch.from_numpy(rows.weights).to(device)
        self.col_weights = torch.from_numpy(cols.weights).to(device)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K, T, T), float32, of a batch of tiles (N, C, T, T)."""
        inputs = _dihedral_views(tiles) if self.tta else tiles
        inputs = inputs.contiguous(memory_format=self.memory_format)
        precision = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with precision:
            logits = self.model(inputs)
        if logits.ndim != 4 or logits.shape[0] != inputs.shape[0] or logits.shape[-2:] != inputs.shape[-2:]:
            raise ValueError(
                f"the model must return logits (N, classes, {self.tile_size}, {self.tile_size}) for tiles "
                f"{tuple(inputs.shape)}; it returned {tuple(logits.shape)}"
            )
        logits = logits.float().contiguous()  # accumulate in float32, (N, K, T, T), whatever autocast ran in
        probs = logits.sigmoid_() if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        return _merge_dihedral(probs) if self.tta else probs

    @torch.inference_mode()
    def __call__(self, image, normalize, tile_rows: range, carry: torch.Tensor | None):
        """Weighted sum (K, rows, padded W) of the tiles in `tile_rows`, `carry` added at the top."""
        rows, cols, size = self.rows, self.cols, self.tile_size
        top = int(rows.starts[tile_rows.start])
        bottom = int(rows.starts[tile_rows.stop - 1]) + size
        source = rows.source_index[top:bottom]
        low, high = int(source.min()), int(source.max()) + 1
        band = image[:, low:high]
        band = _band_tensor(normalize(band) if normalize is not None else band, self.device)
        # Mirrored borders; interior rows and columns are used as read, without a gather.
        inner = max(top, rows.before) - top, min(bottom, rows.before + rows.length) - top  # image rows in the band
        band = _take(band, 1, source - low, *inner)
        band = _take(band, 2, cols.source_index, cols.before, cols.before + cols.length)  # (C, bottom - top, padded W)

        tiles = [(i, j) for i in tile_rows for j in range(len(cols.starts))]
        total = carry
        for first in range(0, len(tiles), self.batch_size):
            batch = tiles[first : first + self.batch_size]
            ys = [int(rows.starts[i]) - top for i, _ in batch]
            xs = [int(cols.starts[j]) for _, j in batch]
            probs = self.forward(torch.stack([band[:, y : y + size, x : x + size] for y, x in zip(ys, xs)]))
            if total is None or total.shape[1] < bottom - top:
                total = grow_sum(total, (probs.shape[1], bottom - top, self.cols.padded_length), self.device)
            row_w = self.row_weights[[i for i, _ in batch]]  # (N, T)
            col_w = self.col_weights[[j for _, j in batch]]
            windows = row_w[:, :, None] * col_w[:, None, :]  # (N, T, T), separable blend weights
            for tile_probs, window, y, x in zip(probs, windows, ys, xs):
                total[:, y : y + size, x : x + size].addcmul_(tile_probs, window)
        return total


def grow_sum(total: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A zeroed float32 weighted sum of `shape` (classes, rows or planes, ...) holding `total`, the part
    carried over from the previous band or slab, at the top."""
    grown = torch.zeros(shape, dtype=torch.float32, device=device)
    if total is not None:
        if total.shape[0] != shape[0]:
            raise ValueError(f"the model returned {shape[0]} classes for one band and {total.shape[0]} for another")
        grown[:, : total.shape[1]] = total
    return grown


def iter_predict_bands(
    model: nn.Module,
    image: Any,
    *,
    tile_size: int = DEFAULT.tile_size,
    overlap: int = DEFAULT.overlap,
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
    """Predict an image band by band: yields (row_start, row_stop, probs) with probs (classes, rows, W) float32.

    Bands come in order, cover every row once, and only one band of input and output is held
    at a time, so a huge image needs memory in proportion to its width.

    Args:
        model: an nn.Module returning logits (N, classes, h, w) for (N, C, h, w). It runs as a
            copy in eval mode with BatchNorm folded into its convolutions, channels-last on CPU
            and CUDA (`unetseg.inference.fold.inference_copy`); the model itself is not changed.
            One output channel gives sigmoid probabilities, several a softmax.
        image: (C, H, W) of any size, anything sliced as `image[:, start:stop]` (numpy,
            `numpy.memmap`/`tifffile.memmap`, torch tensor, zarr); read one band at a time.
        tile_size, overlap, batch_size, blend, pad_mode, tta, amp, compile: see `TilingConfig`.
        normalize: applied to each raw band (C, rows, W) before tiling, e.g.
            `lambda band: Normalization().apply(band, value_range)` with a range computed once
            for the whole image; None takes the image as already normalised.
        device: where tiles are run and stitched; None means the model's device.
        band_transform: applied on the device to each finished band of probabilities (classes,
            rows, W) before it is copied to the host, e.g. a threshold to a uint8 mask, so only
            the smallest type crosses to the host; bands are then what it returns.
    """
    TilingConfig(tile_size, overlap, batch_size, blend, pad_mode, tta, amp, compile)  # checks every setting
    shape = tuple(image.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image must have shape (C, H, W) with C, H, W >= 1; got shape {shape}")
    _, height, width = shape
    device = select_device(model, device)
    rows = _plan_axis(height, tile_size, overlap, blend, pad_mode)
    cols = _plan_axis(width, tile_size, overlap, blend, pad_mode)
    layout = channels_last(device)
    was_training = model.training
    network = inference_copy(model, channels_last=layout, compile=compile)
    converted = network is not model  # a network without conv weights (ONNX Runtime) takes tiles as they are
    memory_format = torch.channels_last if converted and layout else torch.contiguous_format
    predictor = _BandPredictor(
        network, rows, cols, tile_size, batch_size, tta, device, autocast_dtype(device, amp), memory_format
    )
    # Enough tile rows per band to fill a batch, so narrow images still run full batches.
    rows_per_band = max(1, math.ceil(batch_size / len(cols.starts)))
    tile_row_count = len(rows.starts)
    pinned = pinned_transfer(device)

    try:
        carry = None
        for first in range(0, tile_row_count, rows_per_band):
            tile_rows = range(first, min(first + rows_per_band, tile_row_count))
            top = int(rows.starts[first])
            total = predictor(image, normalize, tile_rows, carry)
            # Rows above the next band's first tile get no more contributions: they are final.
            done = int(rows.starts[tile_rows.stop]) - top if tile_rows.stop < tile_row_count else total.shape[1]
            carry = total[:, done:].clone()
            start = max(top - rows.before, 0)
            stop = min(top + done - rows.before, height)
            if start < stop:
                offset = rows.before - top  # band row of image row 0
                probs = total[:, start + offset : stop + offset, cols.before : cols.before + width]
                if band_transform is not None:
                    with torch.inference_mode():
                        probs = band_transform(probs)
                yield start, stop, to_host(probs, pinned)  # `total` is never written again: a view is safe
    finally:
        model.train(was_training)


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


def predict_tiled(
    model: nn.Module,
    image: Any,
    *,
    tile_size: int = DEFAULT.tile_size,
    overlap: int = DEFAULT.overlap,
    batch_size: int = DEFAULT.batch_size,
    blend: str = DEFAULT.blend,
    pad_mode: str = DEFAULT.pad_mode,
    tta: bool = DEFAULT.tta,
    normalize: Callable[[Any], Any] | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = DEFAULT.amp,
    compile: bool = DEFAULT.compile,
    out: Any = None,
) -> np.ndarray:
    """Predict a whole (C, H, W) image tile by tile; returns probabilities (classes, H, W), float32.

    Takes the arguments of `iter_predict_bands`, plus:
        out: a (classes, H, W) array written band by band and returned, e.g. a
            `tifffile.memmap` for images too large for memory; None allocates one.

    A volume (C, Z, Y, X) with a 3-D model (3-D convolution weights) is predicted in 3-D tiles,
    slab by slab along Z (`unetseg.inference.volume.iter_predict_slabs`); tile_size and overlap
    may then give one value per axis (Z, Y, X).
    """
    if len(image.shape) == 4 and any(parameter.ndim == 5 for parameter in model.parameters()):
        from unetseg.inference.volume import predict_volume_tiled

        options = dict(tile_size=tile_size, overlap=overlap, batch_size=batch_size, blend=blend, pad_mode=pad_mode)
        options.update(tta=tta, normalize=normalize, device=device, amp=amp, compile=compile)
        return predict_volume_tiled(model, image, out=out, **options)
    height, width = tuple(image.shape)[-2:] if len(image.shape) == 3 else (0, 0)
    bands = iter_predict_bands(
        model,
        image,
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        pad_mode=pad_mode,
        tta=tta,
        normalize=normalize,
        device=device,
        amp=amp,
        compile=compile,
    )
    for start, stop, probs in bands:
        expected = (probs.shape[0], height, width)
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"out must have shape {expected} (classes, H, W); got {tuple(out.shape)}")
        out[:, start:stop] = probs
    return out
