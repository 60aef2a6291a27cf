"""Instance labels of huge images and volumes in bounded memory: overlapping blocks, objects merged across
borders.

Probabilities arrive in order along the first spatial axis from the tiled engine: bands of
rows of a plane, or slabs of planes of a volume. `BlockLabeler` gathers them into blocks of
that axis, whole along the others: a core of `block_rows` rows (planes) with `context` rows
on either side, labels each block with `postprocess.to_labels` (2-D or 3-D, with the voxel
spacing), and keeps the objects whose foreground region (fully connected) begins in the core
and does not touch the block's cut edges, as StarDist's `predict_instances_big` keeps objects
by block. A block larger than BLOCK_PIXELS (a few planes of a big volume are already tens of
millions of voxels) is labelled in cells along the other axes too, each with `side_context`
pixels of context, owned by the cell whose core holds the first corner of an object's
bounding box: StarDist's `BlockND`. Every step of `to_labels` (distance transform, peaks,
watershed, size filter) looks only at a foreground region and its surroundings, so a region
that fits in the context along every axis gets exactly the labels whole-array processing gives
it, up to their numbers. Larger regions are cut at block edges (a warning says so). Memory
holds one block's probabilities, (classes, block_rows + 2 context, ...), its labels, and
`to_labels`' arrays of one cell (scipy's distance transform alone takes about 40 bytes a
voxel), with block_rows chosen from the size of one row or plane (`block_rows_for`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from unetseg.inference.postprocess import to_labels

__all__ = [
    "BLOCK_PIXELS",
    "BLOCK_ROWS",
    "CONTEXT_ROWS",
    "BlockLabeler",
    "block_cells",
    "block_rows_for",
    "owned_objects",
]

log = logging.getLogger(__name__)

BLOCK_ROWS, CONTEXT_ROWS = 1024, 128  # most core rows per block; rows of context above and below it (images)
CONTEXT_PLANES = 8  # planes of context of a volume's blocks: nuclei of 2 micron slices are 4 to 6 planes deep
SIDE_CONTEXT_3D = 64  # pixels of context along Y and X of a volume's cells: nuclei 20 to 40 pixels across
BLOCK_PIXELS = 8_000_000  # pixels of a block with its context: (classes, rows, W) float32 and to_labels' arrays
CELL_PIXELS = 4_000_000  # voxels of a cell of a block too large for one to_labels call, context included
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


def block_cells(shape: Sequence[int], context: int, budget: int | None = None) -> list[tuple[slice, ...]]:
    """The cores of the cells of a block of `shape` (rows, ...) along its axes after the first: one cell
    (the whole block) when it holds at most BLOCK_PIXELS, else square cores whose cells, with `context`
    on each side, hold about `budget` (default CELL_PIXELS) pixels (cores at least `context` wide)."""
    budget = CELL_PIXELS if budget is None else budget
    rows, sides = shape[0], [int(n) for n in shape[1:]]
    if rows * np.prod(sides) <= BLOCK_PIXELS:
        return [tuple(slice(0, n) for n in sides)]
    span = int((budget / rows) ** (1 / len(sides)))
    core = max(span - 2 * context, context, 1)
    grids = [[slice(start, min(start + core, n)) for start in range(0, n, core)] for n in sides]
    return list(itertools.product(*grids))


def owned_objects(
    labels: np.ndarray, foreground: np.ndarray, core: Sequence[tuple[int, int]], cuts: Sequence[tuple[bool, bool]]
) -> tuple[np.ndarray, int]:
    """`labels` (block rows, ...) keeping only the objects this block owns, and how many regions were cut.

    A foreground region is owned when the first corner of its bounding box lies in `core` ((start,
    stop) per axis, leading axes; axes not given are not restricted), and it is kept whole; a
    region touching a cut edge (`cuts`: (low, high) per axis, True where the block's edge is not
    the array's) is incomplete here and counted.
    """
    regions, _ = ndimage.label(foreground, structure=np.ones((3,) * foreground.ndim, dtype=bool))
    slices = ndimage.find_objects(regions)
    keep = np.zeros(len(slices) + 1, dtype=bool)
    cut = 0
    for index, found in enumerate(slices, start=1):
        if found is None or not all(low <= box.start < high for box, (low, high) in zip(found, core)):
            continue
        keep[index] = True
        edges = zip(found, cuts, labels.shape)
        if any((low and box.start == 0) or (high and box.stop == n) for box, (low, high), n in edges):
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
        side_context: pixels of context along the other axes of a block labelled in cells; None: the
            block context of an image, SIDE_CONTEXT_3D of a volume.
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
        side_context: int | None = None,
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
        if side_context is None:
            side_context = context if len(self.shape) == 2 else SIDE_CONTEXT_3D
        self.side_context = side_context
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
                "%d object(s) larger than the block context (%d rows, %d pixels across) were cut at block "
                "borders; raise the context for exact labels",
                self.cut,
                self.context,
                self.side_context,
            )
        return self.next_label

    def _label_block(self, core_start: int, core_stop: int, block_stop: int) -> None:
        """Label rows [core_start - context, block_stop) cell by cell, paint the owned objects, drop rows no
        longer needed."""
        block_start = max(core_start - self.context, 0)
        probs = self._rows(block_start, block_stop)
        rows_core = (core_start - block_start, core_stop - block_start)
        rows_cut = (block_start > 0, block_stop < self.height)
        cells = block_cells(probs.shape[1:], self.side_context)
        block = None if len(cells) == 1 else np.zeros(probs.shape[1:], np.uint32)
        for cores in cells:
            window = tuple(
                slice(max(core.start - self.side_context, 0), min(core.stop + self.side_context, n))
                for core, n in zip(cores, probs.shape[2:])
            )
            labels = to_labels(
                np.ascontiguousarray(probs[(slice(None), slice(None), *window)]), self.threshold, **self.label_options
            )
            owned, cut = owned_objects(
                labels,
                labels > 0,
                [rows_core] + [(core.start - w.start, core.stop - w.start) for core, w in zip(cores, window)],
                [rows_cut] + [(w.start > 0, w.stop < n) for w, n in zip(window, probs.shape[2:])],
            )
            del labels
            self.cut += cut
            owned = self._number(owned)
            if block is None:
                block = owned
            else:
                region = block[(slice(None), *window)]
                np.copyto(region, owned, where=owned > 0)
        self.paint(block_start, block)
        keep_from = max(core_stop - self.context, 0)  # the next block's first row
        self._bands = [(start, probs) for start, probs in self._bands if start + probs.shape[1] > keep_from]

    def _number(self, owned: np.ndarray) -> np.ndarray:
        """`owned` (uint) objects renumbered from next_label on, in order (uint32)."""
        numbers = np.unique(owned)  # no return_inverse: it would be an int64 array of the block
        numbers = numbers[numbers > 0]
        count = len(numbers)
        lookup = np.zeros(int(owned.max(initial=0)) + 1, dtype=np.uint32)
        lookup[numbers] = np.arange(self.next_label, self.next_label + count, dtype=np.uint32)
        self.next_label += count
        return lookup[owned]
