"""The first pass of a block-wise run: the normalisation range of every plane (a 2-D model) or of the volume
(a 3-D model) over the whole image, as one machine takes them, computed on the cluster."""

from __future__ import annotations

from typing import Any

import numpy as np
from distributed import Client

from unetseg.distributed.geometry import BlockGrid
from unetseg.distributed.model import ClusterModel
from unetseg.distributed.worker import add, block_histogram, histogram_range, streamed_range

__all__ = ["REDUCE_FAN_IN", "normalisation_ranges"]

REDUCE_FAN_IN = 16  # histograms summed per task of the reduction tree


def normalisation_ranges(
    client: Client, model: ClusterModel, source: str, image: Any, grid: BlockGrid, token: str
) -> list:
    """The normalisation range of every plane (2-D model) or of the volume (3-D model): exact histograms of the
    blocks summed on the cluster for 8/16-bit inputs, else one streaming task per plane (volume)."""
    spec, dtype = model.spec, np.dtype(image.planes.dtype).newbyteorder("=")
    groups: list[int | None] = list(range(grid.shape[0])) if model.dims == 2 else [None]
    if dtype.kind == "u" and dtype.itemsize <= 2:
        low, high = spec.normalization.low, spec.normalization.high
        finals = []
        for group in groups:
            blocks = [b for b in grid if group is None or b.core[0] == (group, group + 1)]
            counts = client.map(
                block_histogram,
                [model.plugin] * len(blocks),
                [source] * len(blocks),
                [b.core for b in blocks],
                [spec.in_channels] * len(blocks),
                key=[f"unetseg-histogram-{token}-{b.name}" for b in blocks],
            )
            while len(counts) > REDUCE_FAN_IN:
                counts = [
                    client.submit(add, *counts[i : i + REDUCE_FAN_IN]) for i in range(0, len(counts), REDUCE_FAN_IN)
                ]
            finals.append(client.submit(histogram_range, low, high, *counts))
        return [list(value) for value in client.gather(finals)]
    count = len(groups)
    futures = client.map(streamed_range, [model.plugin] * count, [source] * count, groups, [spec] * count, pure=False)
    return [list(value) for value in client.gather(futures)]
