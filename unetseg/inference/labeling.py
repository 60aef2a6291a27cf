"""Instance labels of huge images and volumes in bounded memory: overlapping blocks along the first axis,
objects merged across borders.

Probabilities arrive in order along the first spatial axis from the tiled engine: bands of
rows of a plane, or slabs of planes of a volume. `BlockLabeler` gathers them into blocks of
that axis, whole along the others: a core of `block_rows` rows (planes) with `context` rows
on either side, labels each block with `postprocess.to_labels` (2-D or 3-D, with the voxel
spacing), and keeps the objects whose foreground region (fully connected) begins in the core
and does not touch the block's cut edges, as StarDist's `predict_instances_big` keeps objects
by block. Every step of `to_labels` (distance transform, peaks, watershed, size filter) looks
only at a foreground region and its surroundings, so a region at most context / 2 rows high
gets exactly the labels whole-array processing gives it, up to their numbers. Taller regions
are cut at block edges (a warning says so). Memory holds one block: (classes, block_rows + 2
context, ...) probabilities and its labels, with block_rows chosen from the size of one row
or plane (`block_rows_for`) so that a block holds about BLOCK_PIXELS pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from unetseg.inference.postprocess import to_labels

__all__ = ["BLOCK_PIXELS", "BLOCK_ROWS", "CONTEXT_ROWS", "BlockLabeler", "block_rows_for", "owned_objects"]

log = logging.getLogger(__name__)

BLOCK_ROWS, CONTEXT_ROWS = 1024, 128  # most core rows per block; rows of context above and below it (images)
CONTEXT_PLANES = 8  # planes of context of a volume's blocks: nuclei of 2 micron slices are 4 to 6 planes deep
BLOCK_PIXELS = 8_000_000  # pixels of a block with its context: (classes, rows, W) float32 and to_labels' arrays
MIN_BLOCK_ROWS = 128
MIN_BLOCK_PLANES = 8


def block_rows_for(row_pixels: int, context: int = CONTEXT_ROWS, minimum: int = MIN_BLOCK_ROWS) -> int:
    """Core rows per block when one row holds `row_pixels` (an image's width; a volume's Y x X): blocks of
    about BLOCK_PIXELS, at most BLOCK_ROWS rows, at least `minimum`.

    Memory stays bounded whatever the width (8 M pixels: 1024 + 256 rows up to 6000 wide, 410 + 256
    rows at 12000); very wide images (and big planes) grow their blocks again at the minimum.
    """
    return int(min(BLOCK_ROWS, max(minimum, BLOCK_PIXELS // max(row_pixels, 1) - 2 * context)))


def block_geometry(shape: Sequence[int]) -> tuple[int, int]:
    """(core rows, context rows) of the blocks of an array of spatial `shape`: rows of an image, planes of a volume."""
    row_pixels = int(np.prod(shape[1:]))
    if len(shape) == 2:
        return block_rows_for(row_pixels), CONTEXT_ROWS
    return block_rows_for(row_pixels, CONTEXT_PLANES, MIN_BLOCK_PLANES), CONTEXT_PLANES


def owned_objects(
    labels: np.ndarray, foreground: np.ndarray, core: tuple[int, int], cut_top: bool, cut_bottom: bool
) -> tuple[np.ndarray, int]:
    """`labels` (block rows, ...) keeping only the objects this block owns, and how many regions were cut.

    A foreground region is owned when its first row (plane) lies in `core` (start, stop) of the
    block, and it is kept whole; a region touching a cut edge (`cut_top` / `cut_bottom`: the
    block edge is not the array's edge) is incomplete here and counted.
    """
    regions, _ = ndimage.label(foreground, structure=np.ones((3,) * foreground.ndim, dtype=bool))
    slices = ndimage.find_objects(regions)
    keep = np.zeros(len(slices) + 1, dtype=bool)
    cut = 0
    for index, found in enumerate(slices, start=1):
        if found is None:
            continue
        first, last = found[0].start, found[0].stop  # rows [first, last) of the region
        if not core[0] <= first < core[1]:
            continue
        keep[index] = True
        if (cut_top and first == 0) or (cut_bottom and last == labels.shape[0]):
            cut += 1
    return np.where(keep[regions], labels, 0), cut


class BlockLabeler:
    """Turns a stream of probability bands of one plane (or slabs of one volume) into owned objects of
    overlapping blocks.

    Args:
        shape: the spatial shape: (H, W) of a plane, (Z, Y, X) of a volume.
        paint: called as paint(first_row, labels) for each block, labels (rows, ...) uint32 holding
            the block's owned objects with their final numbers (0 elsewhere); objects of
            different blocks never overlap, and a block's rows may reach into earlier ones.
        threshold, label_options: arguments of `to_labels`.
        block_rows, context: core rows per block and rows of context on each side; None: `block_geometry`.
        first_label: the number of the first object (numbers run on across planes).
        spacing: the voxel size (one value per axis) of the 3-D watershed; None: isotropic.
    """

    def __init__(
        self,
        shape: Sequence[int],
        paint: Callable[[int, np.ndarray], Any],
        threshold: float = 0.5,
        label_options: dict | None = None,
        block_rows: int | None = None,
        context: int | None = None,
        first_label: int = 1,
        spacing: Sequence[float] | None = None,
    ):
        self.shape = tuple(int(n) for n in shape)
        default_rows, default_context = block_geometry(self.shape)
        block_rows = default_rows if block_rows is None else block_rows
        context = default_context if context is None else context
        if block_rows < 1 or context < 0:
            raise ValueError(f"block_rows must be >= 1 and context >= 0, got {block_rows}, {context}")
        self.height, self.paint = self.shape[0], paint
        self.threshold, self.label_options = threshold, dict(label_options or {})
        if spacing is not None and len(self.shape) == 3:
            self.label_options["spacing"] = tuple(spacing)
        self.block_rows, self.context = block_rows, context
        self.next_label = first_label
        self.cut = 0
        self._core_start = 0  # core of the next block
        self._bands: list[tuple[int, np.ndarray]] = []  # (first row, probabilities) not yet wholly labelled
        self._received = 0  # rows given so far

    def add(self, start: int, stop: int, probs: np.ndarray) -> None:
        """Take the probabilities (classes, stop - start, ...) of rows start..stop (in order, no gaps)."""
        if start != self._received:
            raise ValueError(f"bands must come in order: expected row {self._received}")
        self._bands.append((start, probs))  # kept as given: a block is assembled once, when it is complete
        self._received = stop
        while self._core_start < self.height:
            core_stop = min(self._core_start + self.block_rows, self.height)
            block_stop = min(core_stop + self.context, self.height)
            if stop < block_stop:
                return
            self._label_block(self._core_start, core_stop, block_stop)
            self._core_start = core_stop

    def _rows(self, first: int, last: int) -> np.ndarray:
        """The probabilities of rows first..last, copied out of the bands held (one array of the block's size)."""
        parts = [
            probs[:, max(first - start, 0) : last - start]
            for start, probs in self._bands
            if start < last and start + probs.shape[1] > first
        ]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else np.ascontiguousarray(parts[0])

    def finish(self) -> int:
        """Check every row was given and labelled; returns the next free label number."""
        if self._core_start < self.height:
            raise ValueError(f"bands stopped at row {self._received} of {self.height}")
        if self.cut:
            log.warning(
                "%d object(s) taller than the block context (%d rows) were cut at block borders; "
                "raise the context for exact labels",
                self.cut,
                self.context,
            )
        return self.next_label

    def _label_block(self, core_start: int, core_stop: int, block_stop: int) -> None:
        """Label rows [core_start - context, block_stop), paint the owned objects, drop rows no longer needed."""
        block_start = max(core_start - self.context, 0)
        labels = to_labels(self._rows(block_start, block_stop), self.threshold, **self.label_options)
        owned, cut = owned_objects(
            labels,
            labels > 0,
            (core_start - block_start, core_stop - block_start),
            cut_top=block_start > 0,
            cut_bottom=block_stop < self.height,
        )
        self.cut += cut
        numbers = np.unique(owned)  # no return_inverse: it would be an int64 array of the block
        numbers = numbers[numbers > 0]
        count = len(numbers)
        lookup = np.zeros(int(owned.max(initial=0)) + 1, dtype=np.uint32)
        lookup[numbers] = np.arange(self.next_label, self.next_label + count, dtype=np.uint32)
        self.paint(block_start, lookup[owned])
        self.next_label += count
        keep_from = max(core_stop - self.context, 0)  # the next block's first row
        self._bands = [(start, probs) for start, probs in self._bands if start + probs.shape[1] > keep_from]
