"""Prediction on a Dask cluster, driven from the client (`predict_on_cluster`, what `unetseg-predict --dask` calls):
the model on every worker (`unetseg.distributed.model`), then one image or volume block by block
(`unetseg.distributed.blocks`), or a folder file by file (`unetseg.distributed.files`).

Their public names (and the default block and halo sizes of `unetseg.distributed.plan`) are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from torch import nn

from unetseg.distributed.blocks import BlockReport, predict_blocks
from unetseg.distributed.cluster import connect, local_threads
from unetseg.distributed.files import predict_files_on_cluster, split_done
from unetseg.distributed.model import ClusterModel, use_model
from unetseg.distributed.plan import BLOCK_2D, BLOCK_3D, HALO_2D, HALO_3D, check_blockwise
from unetseg.inference.batch import PredictSummary, plan_outputs
from unetseg.inference.pipeline import PredictSettings, open_input
from unetseg.io.registry import container
from unetseg.spec import InputSpec

__all__ = [
    "BLOCK_2D",
    "BLOCK_3D",
    "HALO_2D",
    "HALO_3D",
    "BlockReport",
    "ClusterModel",
    "predict_blocks",
    "predict_files_on_cluster",
    "predict_on_cluster",
    "use_model",
]

log = logging.getLogger(__name__)


def _is_folder(input: Path) -> bool:
    """True for a folder of images, False for one image (a file, or an OME-Zarr image folder)."""
    return input.is_dir() and container(input) != "ome-zarr"


def predict_on_cluster(
    cluster: str | Client,
    model: str | Path | tuple[nn.Module, InputSpec],
    input: str | Path,
    output: str | Path | None = None,
    settings: PredictSettings = PredictSettings(),
    *,
    pairs: Sequence[tuple[Path, Path]] | None = None,
    glob: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    block: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    announce: Callable[[str], Any] | None = None,
) -> PredictSummary:
    """`unetseg-predict INPUT OUTPUT --dask ADDRESS`: one image block by block (`predict_blocks`), or a folder file
    by file (`predict_files_on_cluster`), on a Dask cluster.

    Args:
        cluster: an address for `connect` ("local:4", "tcp://host:8786", "slurm:8") or a `Client`.
        model: a model file the workers can read, or (network, input spec) (see `use_model`).
        input, output, glob: as `unetseg-predict` takes them (`plan_outputs`); or
        pairs: the (input, output) pairs already planned (e.g. one --shard of them).
        settings, overwrite, progress: as `predict_files`; one image needs settings.format "ome-zarr".
        device: "auto", "cpu" or "cuda", on each worker.
        block, halo: of a block-wise run (`predict_blocks`).
        announce: called with the link to the cluster's dashboard once connected.

    Returns a `PredictSummary` (files done, skipped, failed).
    """
    input = Path(input)
    if pairs is None:
        if output is None:
            raise ValueError("give an output (or the planned pairs)")
        pairs = plan_outputs(input, output, glob)
    single = not _is_folder(input)
    if single:
        check_blockwise(settings)
    threads = local_threads(cluster) if isinstance(cluster, str) else None
    with connect(cluster) if isinstance(cluster, str) else nullcontext(cluster) as client:
        if announce is not None:
            announce(client.dashboard_link)
        on_cluster = use_model(client, model, device, threads)
        settings.check(on_cluster.spec)
        if not single:
            return predict_files_on_cluster(client, on_cluster, pairs, settings, overwrite, progress)
        todo, skipped = split_done(pairs, settings, overwrite)
        summary = PredictSummary(skipped=skipped)
        for source, target in todo:
            try:
                report = predict_blocks(
                    client, on_cluster, source, target, settings, block=block, halo=halo, progress=progress
                )
            except Exception as error:  # a file that cannot be predicted: named, exit status 1
                summary.failed[source] = " ".join(str(error).removeprefix(f"{source}: ").split())
                log.error("%s: %s", source, summary.failed[source])
                log.debug("%s: traceback", source, exc_info=True)
                continue
            log.info(
                "%s: %d blocks (%d predicted, %d resumed)%s in %.1f s",
                source,
                report.blocks,
                report.predicted,
                report.reused,
                f", {report.objects} objects" if report.objects is not None else "",
                report.seconds,
            )
            summary.done.append(source)
            summary.pixels += int(np.prod(open_input(source, None).shape))
            summary.seconds += report.seconds
        return summary
