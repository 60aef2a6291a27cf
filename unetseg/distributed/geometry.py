"""Blocks of an image or volume for a cluster: cores that tile the (Z, Y, X) grid, the halo labels need around
each core, and the input region whose tiles give the core and halo exactly the single-machine probabilities.

Pure geometry, no dask. A block's input region is the union of the whole-image tile grid's tiles
(`unetseg.inference.tiling.tile_starts`) that touch its core and halo: predicting that region with
the same tile size and overlap lays out the very same tiles, and every core and halo position is
covered by the same tiles, with the same blend weights, as in a whole-image run. So blocks are
seamless for any model and any blend, not only within a tolerance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from unetseg.inference.tiling import padding, tile_starts

__all__ = ["Block", "BlockGrid", "aligned_block", "tile_span"]

Span = tuple[int, int]  # [start, stop) along one axis


def tile_span(length: int, tile_size: int, overlap: int, start: int, stop: int) -> Span:
    """The positions [first, last) of the whole-axis tiles that touch [start, stop): what a block must read so
    that its tiles are those of the whole axis. An axis shorter than a tile is padded whole: all of it."""
    before, after = padding(length, tile_size)
    if before or after:
        return 0, length
    starts = tile_starts(length, tile_size, overlap)
    touching = starts[(starts < stop) & (starts + tile_size > start)]
    return int(touching[0]), int(touching[-1]) + tile_size


def aligned_block(chunk: int | None, target: int, length: int) -> int:
    """A block side along one axis: a multiple of the input's chunk near `target` (chunks larger than the target:
    the target), at most the axis length, so blocks read whole input chunks and write whole output chunks."""
    if chunk is None or chunk < 1 or chunk >= target:
        side = target
    else:
        side = chunk * max(1, round(target / chunk))
    return max(1, min(side, length))


@dataclass(frozen=True)
class Block:
    """One block: its index in the grid, its core (the positions it writes), the region it labels (core and
    halo) and the region it reads (the tiles covering both), each a [start, stop) per axis (Z, Y, X)."""

    index: tuple[int, int, int]
    core: tuple[Span, Span, Span]
    labelled: tuple[Span, Span, Span]
    region: tuple[Span, Span, Span]

    @property
    def name(self) -> str:
        """A file-name-safe key: z_y_x grid indices."""
        return "_".join(map(str, self.index))

    def core_slices(self, within: str = "image") -> tuple[slice, slice, slice]:
        """The core as slices of the image ("image"), of the labelled region ("labelled") or of the read region."""
        origin = {
            "image": (0, 0, 0),
            "labelled": [lo for lo, _ in self.labelled],
            "region": [lo for lo, _ in self.region],
        }
        return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(self.core, origin[within]))

    def labelled_slices(self) -> tuple[slice, slice, slice]:
        """The labelled region as slices of the read region."""
        return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(self.labelled, self.region))

    @property
    def voxels(self) -> int:
        return math.prod(hi - lo for lo, hi in self.core)


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of a (Z, Y, X) array predicted by a 2-D model (each plane by itself: blocks one plane deep,
    no halo or tiles along Z) or a 3-D model.

    Args:
        shape: (Z, Y, X).
        block: core size per axis (Z, Y, X); the cores tile the array, the last ones shorter.
        halo: positions of label context on each side of a core, per axis (0 where no labels are made).
        tiles, overlaps: tile size and overlap of the engine per axis; None along Z for a 2-D model.
    """

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    tiles: tuple[int | None, int, int]
    overlaps: tuple[int | None, int, int]

    def __post_init__(self):
        if len(self.shape) != 3 or len(self.block) != 3 or len(self.halo) != 3:
            raise ValueError(
                f"shape, block and halo need 3 values (Z, Y, X); got {self.shape}, {self.block}, {self.halo}"
            )
        if min(self.block) < 1 or min(self.halo) < 0:
            raise ValueError(f"block sizes must be >= 1 and halos >= 0; got block {self.block}, halo {self.halo}")

    @property
    def counts(self) -> tuple[int, int, int]:
        """Blocks along each axis."""
        return tuple(-(-length // side) for length, side in zip(self.shape, self.block))

    def __len__(self) -> int:
        return math.prod(self.counts)

    def block_at(self, index: Sequence[int]) -> Block:
        """The block with grid index (iz, iy, ix)."""
        core, labelled, region = [], [], []
        for axis, (i, side, length, halo) in enumerate(zip(index, self.block, self.shape, self.halo)):
            lo, hi = i * side, min((i + 1) * side, length)
            label_lo, label_hi = max(0, lo - halo), min(length, hi + halo)
            tile = self.tiles[axis]
            span = (
                (label_lo, label_hi)
                if tile is None
                else tile_span(length, tile, self.overlaps[axis], label_lo, label_hi)
            )
            core.append((lo, hi))
            labelled.append((label_lo, label_hi))
            region.append(span)
        return Block(tuple(int(i) for i in index), tuple(core), tuple(labelled), tuple(region))

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(n) for n in self.counts)):
            yield self.block_at(index)

    def neighbour(self, block: Block, axis: int) -> Block | None:
        """The block after `block` along `axis` (sharing its high face), or None at the array's end."""
        index = list(block.index)
        index[axis] += 1
        return self.block_at(index) if index[axis] < self.counts[axis] else None
