"""The passes of a block-wise run after every block is predicted: the labels stitched across block faces (faces
matched on the workers, the merge here, every block's labels rewritten with their final numbers), a warning when
objects reached a block's halo, and the pyramid levels of every output, a task per chunk."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

from distributed import Client, wait

from unetseg.distributed.geometry import BlockGrid
from unetseg.distributed.merge import merge_labels
from unetseg.distributed.plan import face_axes
from unetseg.distributed.store import BlockStore, WorkFolder
from unetseg.distributed.worker import halve_chunk, match_faces, relabel_block

__all__ = ["build_pyramids", "stitch_labels", "warn_reach"]

log = logging.getLogger(__name__)


def stitch_labels(
    client: Client,
    grid: BlockGrid,
    results: dict[str, dict],
    ids: str,
    labels: str,
    stack: bool,
    dims: int,
    work: WorkFolder,
    token: str,
) -> int:
    """Match the faces, merge the labels (union-find) and write every block's final labels; returns the object count."""
    blocks = list(grid)
    order = {b.name: i for i, b in enumerate(blocks)}
    axes = face_axes(dims)
    neighbours = [
        [(axis, other.name) for axis in axes if (other := grid.neighbour(b, axis)) is not None] for b in blocks
    ]
    matched = [(b, n) for b, n in zip(blocks, neighbours) if n]
    futures = client.map(
        match_faces,
        [str(work.path)] * len(matched),
        [b.name for b, _ in matched],
        [n for _, n in matched],
        key=[f"unetseg-faces-{token}-{b.name}" for b, _ in matched],
    )
    pairs = []
    for (b, _), found in zip(matched, client.gather(futures)):
        pairs.extend((order[b.name], order[other], p) for other, p in found)
    written = [int(results[b.name]["written"]) for b in blocks]
    totals = [int(results[b.name]["total"]) for b in blocks]
    lookups, count = merge_labels(written, totals, pairs)
    futures = client.map(
        relabel_block,
        [ids] * len(blocks),
        [labels] * len(blocks),
        [b.core_slices() for b in blocks],
        [stack] * len(blocks),
        lookups,
        key=[f"unetseg-relabel-{token}-{b.name}" for b in blocks],
    )
    wait(futures)
    client.gather(futures)  # raises a task's error
    return count


def warn_reach(source: Path, cut: int, extent: int, grid: BlockGrid, dims: int) -> None:
    """Warn when `cut` object regions reached a block's halo (labels may differ from one machine's) or the largest
    region's `extent` came close to it."""
    halo = min(grid.halo[axis] for axis in face_axes(dims))
    if cut:
        log.warning(
            "%s: %d object region(s) reached the edge of a block's halo (%s); their labels may differ from a "
            "single-machine run (never split at a block face, but touching objects in them may be merged): raise halo",
            source,
            cut,
            grid.halo,
        )
    elif extent > halo / 2:
        log.warning(
            "%s: the largest object region spans %d pixels, over half the halo (%d); larger ones would be cut at "
            "block borders: consider a larger halo",
            source,
            extent,
            halo,
        )


def _chunk_slices(shape: tuple, chunks: tuple) -> list[tuple[slice, ...]]:
    """Every chunk of an array, as slices."""
    axes = [[slice(start, min(start + c, n)) for start in range(0, n, c)] for n, c in zip(shape, chunks)]
    return list(itertools.product(*axes))


def build_pyramids(client: Client, stores: Sequence[BlockStore], token: str) -> None:
    """Make the pyramid levels of every output on the cluster, level by level, a task per chunk."""
    paths = {id(store): [store.array_path(), *store.create_levels()] for store in stores}
    depth = max((len(p) for p in paths.values()), default=1)
    for level in range(1, depth):
        futures = []
        for store in stores:
            chain = paths[id(store)]
            if level >= len(chain):
                continue
            shape = store.group[str(level)].shape
            chunks = _chunk_slices(shape, store.array.chunks)
            futures += client.map(
                halve_chunk,
                [chain[level - 1]] * len(chunks),
                [chain[level]] * len(chunks),
                chunks,
                key=[f"unetseg-level-{token}-{store.path.name}-{level}-{i}" for i in range(len(chunks))],
            )
        wait(futures)
        client.gather(futures)
