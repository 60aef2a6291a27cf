"""The plan of a block-wise run, before anything runs: the settings it can honour, its block grid (block and
halo sizes from the model, the settings and the input's chunks) and its outputs, chunked by blocks.

No cluster here: the client builds the plan from an input opened lazily (its shape, chunks and
scale, not its pixels), and the passes (`unetseg.distributed.blocks`) carry it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.distributed.geometry import BlockGrid, aligned_block
from unetseg.distributed.model import ClusterModel
from unetseg.distributed.store import BlockStore
from unetseg.inference.labeling import CONTEXT_PLANES, CONTEXT_ROWS
from unetseg.inference.pipeline import PredictSettings
from unetseg.inference.sinks import layout
from unetseg.io.zarr import LazyPlanes
from unetseg.spec import InputSpec

__all__ = [
    "BLOCK_2D",
    "BLOCK_3D",
    "HALO_2D",
    "HALO_3D",
    "block_grid",
    "check_blockwise",
    "face_axes",
    "input_chunks",
    "open_stores",
]

BLOCK_2D = 1024  # block side (Y, X) of a 2-D model's planes, rounded to the input's chunks
BLOCK_3D = (32, 256, 256)  # block (Z, Y, X) of a 3-D model's volume, rounded to the input's chunks
HALO_2D = CONTEXT_ROWS  # label context around a block: as one machine's blocks of rows have
HALO_3D = (CONTEXT_PLANES, 64, 64)


def check_blockwise(settings: PredictSettings) -> None:
    """Raise ValueError for settings a block-wise run cannot honour."""
    if settings.format != "ome-zarr":
        raise ValueError("block-wise prediction on a cluster writes OME-Zarr outputs: add --format ome-zarr")
    unsupported = [name for name in ("rois", "measure", "overlay") if getattr(settings, name)]
    if unsupported:
        raise ValueError(f"block-wise prediction does not write {', '.join(unsupported)}; predict without them")


def face_axes(dims: int) -> tuple[int, ...]:
    """The axes along which a model of `dims` spatial dims cuts blocks whose labels must be matched."""
    return (0, 1, 2) if dims == 3 else (1, 2)


def input_chunks(planes: Any) -> tuple[int | None, int | None, int | None]:
    """The input's chunk size along (Z, Y, X), None where it is not chunked (a memory map)."""
    if not isinstance(planes, LazyPlanes) or not hasattr(planes.array, "chunks"):
        return None, None, None
    chunks = planes.array.chunks
    return tuple(1 if axis is None else int(chunks[axis]) for axis in planes.order[:3])


def _per_axis(value: int | Sequence[int] | None, default: tuple[int, int, int], name: str) -> tuple[int, int, int]:
    """An int for Y and X (Z from `default`), three values (Z, Y, X), or None for `default`."""
    if value is None:
        return default
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return default[0], int(value), int(value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be an integer (Y and X) or three (Z, Y, X); got {value!r}")
    return values


def block_grid(
    model: ClusterModel, settings: PredictSettings, shape: tuple, chunks: tuple, block: Any, halo: Any
) -> BlockGrid:
    """The block grid of an input of `shape` for this model and settings (see `predict_blocks`)."""
    labels = "labels" in settings.outputs
    if model.dims == 3:
        targets = BLOCK_3D
        default_block = tuple(aligned_block(c, t, n) for c, t, n in zip(chunks, targets, shape))
        block = _per_axis(block, default_block, "block")
        halo = _per_axis(halo, HALO_3D, "halo") if labels else (0, 0, 0)
        tiles, overlaps = settings.volume.tile_size, settings.volume.overlap
    else:
        default_block = (1, *(aligned_block(c, BLOCK_2D, n) for c, n in zip(chunks[1:], shape[1:])))
        block = (1, *_per_axis(block, default_block, "block")[1:])  # a 2-D model: every plane by itself
        halo = (0, *_per_axis(halo, (0, HALO_2D, HALO_2D), "halo")[1:]) if labels else (0, 0, 0)
        tile, overlap = settings.tiling.tile_size, settings.tiling.overlap
        tiles, overlaps = (None, tile, tile), (None, overlap, overlap)
    if labels:
        for axis in face_axes(model.dims):
            if halo[axis] < 1 and shape[axis] > block[axis]:
                raise ValueError(f"labels need a halo of at least 1 along every cut axis; got halo {halo}")
    return BlockGrid(tuple(shape), tuple(block), tuple(halo), tuple(tiles), tuple(overlaps))


def open_stores(
    kinds: Sequence[str], targets: dict[str, Path], spec: InputSpec, image: Any, grid: BlockGrid, resume: bool
) -> dict[str, BlockStore]:
    """One partial OME-Zarr output per kind, chunked by blocks (Z by the block, classes one by one)."""
    stores = {}
    for kind in kinds:
        shape, dtype, axes = layout(kind, spec, image)
        sizes = {"z": grid.block[0], "t": grid.block[0], "y": grid.block[1], "x": grid.block[2]}
        axes = axes.lower()
        chunks = tuple(min(sizes.get(a, 1), n) for a, n in zip(axes, shape))
        stores[kind] = BlockStore(targets[kind], shape, dtype, axes, image.calibration, kind != "prob", chunks, resume)
    return stores
