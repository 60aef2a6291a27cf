"""Instance labels across blocks: per-block ids, the strips of labels across block faces, overlap matching on
them, union-find over the pairs and the final numbering. Pure numpy and scipy, no dask.

Each block labels its core and halo, numbers the objects it writes (those with pixels in its core)
1..written and the objects only in its halo after them, and keeps, for each face of its core, the
two layers of its labels on either side of the face. Two neighbours' strips of one face cover the
same positions: wherever both see an object, the two ids are one object (overlap matching). The
pairs of all faces form a graph whose connected components (scipy's union-find) are the objects;
they are numbered 1..n in the order of their first written id, block by block in grid order.

An object whose foreground region fits in the halo is labelled identically by every block that
sees it, so it is exactly one object here, as in a single-machine run. A region larger than the
halo is cut at the edge of some block's halo and may be split differently there; the matching then
joins every piece its neighbours overlap, so it is never split at a face, but touching objects in
it may be joined. `region_reach` counts such regions so that the caller can warn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unetseg.distributed.geometry import Block

__all__ = ["face_pairs", "face_strips", "local_ids", "merge_labels", "region_reach"]


def local_ids(labels: np.ndarray, core: tuple[slice, ...]) -> tuple[np.ndarray, int, int]:
    """(ids, written, total): `labels` renumbered uint32, objects with pixels in `core` first (1..written), those
    only in the halo after them (written + 1..total)."""
    present = np.unique(labels)
    present = present[present > 0]
    inside = np.unique(labels[core])
    inside = inside[inside > 0]
    halo_only = np.setdiff1d(present, inside, assume_unique=True)
    lookup = np.zeros(int(present[-1]) + 1 if len(present) else 1, dtype=np.uint32)
    lookup[inside] = np.arange(1, len(inside) + 1, dtype=np.uint32)
    lookup[halo_only] = np.arange(len(inside) + 1, len(present) + 1, dtype=np.uint32)
    return lookup[labels], len(inside), len(present)


def face_strips(ids: np.ndarray, block: Block, shape: Sequence[int], axes: Sequence[int]) -> dict[str, np.ndarray]:
    """The labels of the labelled region `ids` (Z, Y, X) in the two layers either side of each inner face of the
    block's core, along `axes`: "low<axis>" at the core's start, "high<axis>" at its end, each spanning the core
    along the other axes. A neighbour's "low" strip of a face covers the positions of this block's "high" one."""
    core = block.core_slices("labelled")
    strips = {}
    for axis in axes:
        (lo, hi), (label_lo, _) = block.core[axis], block.labelled[axis]
        for name, edge, inner in (("low", lo, lo > 0), ("high", hi, hi < shape[axis])):
            if not inner:
                continue
            index = list(core)
            index[axis] = slice(edge - 1 - label_lo, edge + 1 - label_lo)
            strips[f"{name}{axis}"] = np.ascontiguousarray(ids[tuple(index)])
    return strips


def face_pairs(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """(n, 2) distinct (id here, id there) pairs of two blocks' strips of one face, where both see an object."""
    if high.shape != low.shape:
        raise ValueError(f"the strips of one face differ in shape: {high.shape} and {low.shape}")
    both = (high > 0) & (low > 0)
    pairs = np.stack([high[both], low[both]], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def region_reach(labels: np.ndarray, block: Block, shape: Sequence[int], axes: Sequence[int]) -> tuple[int, int]:
    """(cut, extent) of the foreground regions (fully connected) with positions in the block's core: how many
    reach a cut edge of the labelled region along `axes` (their labels may differ from a whole-array run), and
    the largest extent of any along those axes."""
    regions, _ = ndimage.label(labels > 0, structure=np.ones((3,) * labels.ndim, dtype=bool))
    touching = np.unique(regions[block.core_slices("labelled")])
    touching = touching[touching > 0]
    boxes = ndimage.find_objects(regions)
    cut = extent = 0
    for region in touching:
        box = boxes[region - 1]
        reaches = False
        for axis in axes:
            (label_lo, label_hi), side = block.labelled[axis], box[axis]
            extent = max(extent, side.stop - side.start)
            if (side.start == 0 and label_lo > 0) or (side.stop == label_hi - label_lo and label_hi < shape[axis]):
                reaches = True
        cut += reaches
    return cut, extent


def merge_labels(
    written: Sequence[int], totals: Sequence[int], pairs: Iterable[tuple[int, int, np.ndarray]]
) -> tuple[list[np.ndarray], int]:
    """The final number of every written id of every block, and the number of objects.

    Args:
        written, totals: per block (in grid order), its written ids (1..written) and all its ids (1..total).
        pairs: (block a, block b, (n, 2) pairs of an id of a and an id of b that are one object).

    Returns one uint32 lookup (written + 1,) per block, [0] = 0, and the count of objects.
    """
    totals = np.asarray(totals, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(totals)])
    nodes = int(offsets[-1])
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for a, b, matched in pairs:
        rows.append(offsets[a] + matched[:, 0] - 1)
        cols.append(offsets[b] + matched[:, 1] - 1)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False) if nodes else (0, np.zeros(0, np.int64))
    kept = np.concatenate([np.arange(start, start + count) for start, count in zip(offsets, written)] or [[]])
    kept = kept.astype(np.int64)
    groups, first = np.unique(component[kept], return_index=True)
    final = np.zeros(int(component.max(initial=-1)) + 1, dtype=np.uint32)
    final[groups[np.argsort(first)]] = np.arange(1, len(groups) + 1, dtype=np.uint32)
    lookups = [
        np.concatenate([[0], final[component[start : start + count]]]).astype(np.uint32)
        for start, count in zip(offsets, written)
    ]
    return lookups, len(groups)
