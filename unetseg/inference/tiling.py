"""Pure tiling geometry along one axis: padding, tile starts, pad index maps and blend weights.

A 2D tile grid is the product of two axes, and every blend window here is separable, so all
geometry is computed per axis and combined by an outer product in `unetseg.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLENDS = ("gaussian", "mean", "center")
PAD_MODES = ("reflect", "symmetric", "edge")

# Smallest gaussian weight, as MONAI's importance map: every covered pixel keeps a positive weight.
GAUSSIAN_MIN_WEIGHT = 1e-3
# Sigma as a fraction of the tile size, as nnU-Net and MONAI.
GAUSSIAN_SIGMA_SCALE = 0.125


def check_tiling(tile_size: int, overlap: int, blend: str = "gaussian", pad_mode: str = "reflect") -> None:
    """Raise ValueError naming the option when a tiling setting is unusable."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be an integer with 0 <= overlap < tile_size ({tile_size}), got {overlap!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}; got {blend!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}")


@dataclass(frozen=True)
class TilingConfig:
    """How an image is cut into tiles and stitched back: the one home of the tiling defaults.

    Args:
        tile_size: side of the square tiles given to the model (a size the model accepts).
        overlap: least number of pixels shared by neighbouring tiles; the grid has the fewest
            tiles that cover the image with it, flush with the borders, so a model whose receptive
            field radius is at most overlap // 2 gives the whole-image result exactly with
            blend="center".
        batch_size: tiles per forward pass (tta makes the model batch 8 times larger).
        blend: "gaussian" (importance window, sigma tile_size / 8), "mean", or "center" (each
            pixel from the tile where it lies most centrally: the U-Net overlap-tile strategy).
        pad_mode: "reflect", "symmetric" or "edge" padding of the borders (as `numpy.pad`).
        tta: average the probabilities of the 8 flips and quarter turns of each tile; None: as the
            model says (`InputSpec.tta`, set by `unetseg-tune --tta`), else off.
        amp: autocast (bfloat16, or float16 on GPUs without it); None decides per device: on
            for CUDA and for CPUs with native bfloat16 (`unetseg.runtime.precision`).
        compile: run the network through `torch.compile` (off: on the CPU it measured no gain
            worth its compile time; see BENCHMARKS.md).
    """

    tile_size: int = 256
    overlap: int = 64
    batch_size: int = 8
    blend: str = "gaussian"
    pad_mode: str = "reflect"
    tta: bool | None = None
    amp: bool | None = None
    compile: bool = False

    def __post_init__(self):
        check_tiling(self.tile_size, self.overlap, self.blend, self.pad_mode)
        if self.tta not in (None, True, False):
            raise ValueError(f"tta must be None (as the model says), True or False, got {self.tta!r}")
        if self.amp not in (None, True, False):
            raise ValueError(f"amp must be None (per device), True or False, got {self.amp!r}")
        if self.compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


def padding(length: int, tile_size: int) -> tuple[int, int]:
    """(before, after) padding of an axis: none when it holds a tile, else up to one tile, split evenly.

    Tiles are laid flush with the image borders (as MONAI and nnU-Net), so no tile is spent on
    mirrored context: a border pixel sees the network's own border handling, exactly as in a
    forward pass over the whole image. Only an axis shorter than a tile is padded.
    """
    missing = max(0, tile_size - length)
    return missing // 2, missing - missing // 2


def tile_starts(padded_length: int, tile_size: int, overlap: int) -> np.ndarray:
    """Start of each tile along a padded axis: a step of tile_size - overlap, the last tile flush with the end.

    That is the fewest tiles that cover the axis with neighbours sharing at least `overlap`
    pixels: ceil((padded_length - tile_size) / (tile_size - overlap)) + 1. Moving the last tile
    back (rather than padding further) keeps every tile inside the image; it only overlaps its
    neighbour by more than `overlap`.
    """
    if padded_length < tile_size:
        raise ValueError(f"padded_length ({padded_length}) must be at least tile_size ({tile_size})")
    stride = tile_size - overlap
    starts = list(range(0, padded_length - tile_size, stride))
    starts.append(padded_length - tile_size)
    return np.asarray(starts, dtype=np.int64)


def pad_indices(length: int, before: int, after: int, pad_mode: str = "reflect") -> np.ndarray:
    """Source index of every padded position, as `np.pad(mode=pad_mode)` would fill it.

    Pads wider than the axis repeat the mirroring, as `np.pad` does, so an image smaller than
    half a tile is padded cleanly in every mode. Reflect on a one-pixel axis repeats that pixel.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}")
    if length < 1:
        raise ValueError(f"cannot pad an empty axis (length {length})")
    if pad_mode == "reflect" and length == 1:  # numpy refuses to reflect a single pixel
        return np.zeros(length + before + after, dtype=np.int64)
    return np.pad(np.arange(length, dtype=np.int64), (before, after), mode=pad_mode)


def gaussian_window(tile_size: int) -> np.ndarray:
    """1D gaussian importance window, sigma = tile_size / 8, clamped to at least GAUSSIAN_MIN_WEIGHT."""
    position = np.arange(tile_size, dtype=np.float64) - (tile_size - 1) / 2.0
    sigma = GAUSSIAN_SIGMA_SCALE * tile_size
    window = np.exp(-(position**2) / (2.0 * sigma**2))
    return np.maximum(window, GAUSSIAN_MIN_WEIGHT)


def center_owner(padded_length: int, starts: np.ndarray, tile_size: int) -> np.ndarray:
    """For each padded position, the index of the tile in which it lies most centrally.

    Centrality is the distance to the nearer tile edge; ties go to the earlier tile. With a
    step of at most tile_size - overlap every position keeps at least overlap // 2 pixels of
    context on both sides in its owner tile.
    """
    position = np.arange(padded_length, dtype=np.int64)[None, :]
    first = starts[:, None]
    centrality = np.minimum(position - first, first + tile_size - 1 - position)  # < 0 outside the tile
    return np.argmax(centrality, axis=0)


def axis_weights(padded_length: int, starts: np.ndarray, tile_size: int, blend: str = "gaussian") -> np.ndarray:
    """Blend weights (tiles, tile_size) along one axis, normalised to sum to one at every position.

    "gaussian" and "mean" weight every tile by the same window and divide by the summed
    window, clamped away from zero (as MONAI). "center" gives each position wholly to the
    tile in which it lies most centrally. Since the 2D weight sum of a tile grid is the outer
    product of the two axes' sums, normalising each axis normalises the 2D blend.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}; got {blend!r}")
    offsets = starts[:, None] + np.arange(tile_size)[None, :]  # (tiles, tile_size) padded positions
    if blend == "center":
        owner = center_owner(padded_length, starts, tile_size)
        return (owner[offsets] == np.arange(len(starts))[:, None]).astype(np.float32)
    window = gaussian_window(tile_size) if blend == "gaussian" else np.ones(tile_size)
    total = np.zeros(padded_length)
    np.add.at(total, offsets, np.broadcast_to(window, offsets.shape))
    weights = window[None, :] / np.maximum(total[offsets], np.finfo(np.float32).tiny)
    return weights.astype(np.float32)
