"""A folder predicted file by file on a Dask cluster (`predict_files_on_cluster`): each (input, output) pair one
task, `predict_file` on a worker with its atomic outputs; an alternative to --shard."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from distributed import Client, as_completed
from tqdm import tqdm

from unetseg.distributed.model import ClusterModel
from unetseg.distributed.worker import predict_pair
from unetseg.inference.batch import PredictSummary, split_done
from unetseg.inference.pipeline import PredictSettings

__all__ = ["predict_files_on_cluster", "split_done"]

log = logging.getLogger(__name__)


def predict_files_on_cluster(
    client: Client,
    model: ClusterModel,
    pairs: Sequence[tuple[Path, Path]],
    settings: PredictSettings = PredictSettings(),
    overwrite: bool = False,
    progress: bool = False,
) -> PredictSummary:
    """Predict each (input, output) pair as one task on the cluster (an alternative to --shard): `predict_file` on
    a worker, with its atomic outputs. Outputs that exist are skipped unless `overwrite`, so a rerun resumes;
    a file that fails is named and the others go on (as `predict_files`)."""
    todo, skipped = split_done(pairs, settings, overwrite)
    summary = PredictSummary(skipped=skipped)
    futures = client.map(
        predict_pair,
        [model.plugin] * len(todo),
        [str(source) for source, _ in todo],
        [str(target) for _, target in todo],
        [settings] * len(todo),
        pure=False,
    )
    sources = {future.key: source for future, (source, _) in zip(futures, todo)}
    bar = tqdm(total=len(todo), unit="file", desc="files", disable=None if progress else True)
    try:
        with bar:
            for future in as_completed(futures):
                source = sources[future.key]
                try:
                    status, pixels, seconds, reason = future.result()
                except Exception as error:  # the task itself failed (a worker lost too often): name the file
                    status, pixels, seconds, reason = "failed", 0, 0.0, f"{type(error).__name__}: {error}"
                if status == "done":
                    summary.done.append(source)
                    summary.pixels += pixels
                    summary.seconds += seconds
                else:
                    summary.failed[source] = reason
                    log.error("%s: %s", source, reason)
                bar.update()
    except BaseException:
        client.cancel(futures)
        raise
    return summary
