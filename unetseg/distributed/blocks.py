"""One image, stack or volume predicted block by block on a Dask cluster, driven from the client (`predict_blocks`).

The client holds paths, block geometry, per-block counts and the label merge's tables (one integer
per object), never pixels: workers read the input, write the outputs and match the faces.

A block-wise run, in passes:

1. normalisation ranges over the whole image (per plane for a 2-D model, of the volume for a 3-D
   model, as one machine takes them): histograms of the blocks summed on the cluster for 8/16-bit
   inputs, else one streaming task per plane (volume) (`unetseg.distributed.ranges`);
2. every block not finished by an earlier run: probabilities of its core and halo, exactly those
   of a whole-image run (`unetseg.distributed.geometry`); mask and probabilities of the core into
   the outputs; labels of core and halo numbered per block (`unetseg.distributed.merge`);
3. labels: the faces matched (a task per block), the merge (union-find) here, every block's
   labels rewritten with their final numbers (a task per block) (`unetseg.distributed.finish`);
4. the pyramid levels of every output, a task per chunk; then each output is committed (renamed
   into place) and the work folder removed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed
from tqdm import tqdm

from unetseg.distributed.finish import build_pyramids, stitch_labels, warn_reach
from unetseg.distributed.model import ClusterModel
from unetseg.distributed.plan import block_grid, check_blockwise, face_axes, input_chunks, open_stores
from unetseg.distributed.ranges import normalisation_ranges
from unetseg.distributed.store import WorkFolder
from unetseg.distributed.worker import BlockJob, predict_block
from unetseg.inference.pipeline import PredictSettings, open_input, output_targets
from unetseg.io.files import image_stem

__all__ = ["BlockReport", "predict_blocks"]

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """What a block-wise run did: blocks predicted now and reused from an interrupted run, objects labelled, the
    regions that reached a block's halo (`cut`) and the largest region's extent, and where the outputs are."""

    blocks: int
    predicted: int = 0
    reused: int = 0
    objects: int | None = None
    cut: int = 0
    extent: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each pass: ranges, blocks, merge, pyramids
    outputs: dict[str, Path] = field(default_factory=dict)


def predict_blocks(
    client: Client,
    model: ClusterModel,
    source: str | Path,
    target: str | Path,
    settings: PredictSettings = PredictSettings(format="ome-zarr"),
    *,
    block: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    progress: bool = False,
    on_block: Callable[[int, int], Any] | None = None,
) -> BlockReport:
    """Predict one image, stack or volume block by block on the cluster into OME-Zarr outputs.

    The outputs and their names are those of `predict_file` with format "ome-zarr"
    (`output_targets`): mask, probabilities and labels, each chunked by blocks, with the input's
    scale and a pyramid, committed (renamed into place) when every block is done. They equal a
    single-machine run's: probabilities exactly (within float rounding), labels up to their numbers
    for every object whose foreground region fits in the halo (larger ones: see
    `unetseg.distributed.merge`; a warning counts them). An interrupted run (killed client,
    Ctrl-C, lost workers) resumes: blocks finished before are not predicted again.

    Args:
        client, model: the cluster and the model on it (`use_model`).
        source: an OME-Zarr image or a chunked/tiled TIFF (any input `open_source` reads; workers read
            it by this path, so it must be where they can see it, as must the outputs).
        target: the output name, as `predict_file` takes it.
        settings: output kinds, tiling, thresholds; format must be "ome-zarr".
        block: core size of the blocks, an int (Y and X) or (Z, Y, X); None: about BLOCK_2D
            (BLOCK_3D for a 3-D model) rounded to whole input chunks. A 2-D model's blocks are one
            plane deep.
        halo: label context on each side of a block, an int (Y and X) or (Z, Y, X); None: HALO_2D
            (HALO_3D). Objects larger than the halo may be labelled unlike one machine.
        progress: a progress bar over the blocks.
        on_block: called as on_block(done, total) after each block (an exception stops the run, which
            can then be resumed).
    """
    started = time.perf_counter()
    spec, dims = model.spec, model.dims
    settings.check(spec)
    check_blockwise(settings)
    source, target = Path(source), Path(target)
    image = open_input(source, settings.max_pixels)  # lazily: its shape, chunks and scale, not its pixels
    if dims == 3:
        image.stack = True
    shape = image.shape
    grid = block_grid(model, settings, shape, input_chunks(image.planes), block, halo)
    targets = output_targets(source, target, settings)
    token = uuid.uuid4().hex[:8]
    manifest = {
        "input": str(source.resolve()),
        "shape": shape,
        "dtype": str(np.dtype(image.planes.dtype)),
        "model": model.fingerprint,
        "spec": spec.to_dict(),
        "settings": asdict(settings),
        "outputs": {kind: str(path) for kind, path in targets.items()},
        "block": grid.block,
        "halo": grid.halo,
    }
    work = WorkFolder(target.parent / f".{image_stem(target)}.blocks")
    resumed = work.start(manifest)
    stores = open_stores(settings.outputs, targets, spec, image, grid, resumed)
    labels = "labels" in settings.outputs
    lost = not all(store.resumed for store in stores.values()) or (labels and not work.ids.is_dir())
    if resumed and lost:  # an output or the labels' ids were lost: start afresh
        log.warning("%s: the interrupted run's outputs are incomplete; predicting every block again", source)
        work.remove()
        work.start(manifest)
        resumed = False
        stores = open_stores(settings.outputs, targets, spec, image, grid, resumed)
    ids = work.open_ids(shape, grid.block, fresh=not resumed) if labels else None

    finished = work.finished() if resumed else {}
    report = BlockReport(blocks=len(grid), reused=sum(block.name in finished for block in grid))
    pending = [b for b in grid if b.name not in finished]
    ranges = work.ranges() if resumed else None
    if ranges is None and pending:
        ranges = normalisation_ranges(client, model, str(source), image, grid, token)
        work.write_ranges(ranges)
    report.phases["ranges"] = time.perf_counter() - started
    spacing = image.spacing if dims == 3 and all(image.spacing) else None
    outputs = {kind: store.array_path() for kind, store in stores.items() if kind != "labels"}
    jobs = [
        BlockJob(
            plugin=model.plugin,
            source=str(source),
            block=b,
            shape=shape,
            dims=dims,
            stack=image.stack,
            spec=spec,
            settings=settings,
            value_range=tuple(ranges[b.core[0][0] if dims == 2 else 0]),
            outputs=outputs,
            ids=ids,
            work=str(work.path),
            face_axes=face_axes(dims),
            spacing=spacing,
        )
        for b in pending
    ]
    log.info(
        "%s: %d blocks %s, %d to predict (%d finished before)", source, len(grid), grid.block, len(jobs), report.reused
    )
    results = dict(finished)
    futures = client.map(
        predict_block, jobs, key=[f"unetseg-block-{token}-{job.block.name}" for job in jobs], retries=1
    )
    names = {future.key: job.block.name for future, job in zip(futures, jobs)}
    bar = tqdm(
        total=len(grid), initial=report.reused, unit="block", desc=source.name, disable=None if progress else True
    )
    try:
        with bar:
            for future in as_completed(futures):
                results[names[future.key]] = future.result()
                report.predicted += 1
                bar.update()
                if on_block is not None:
                    on_block(report.predicted + report.reused, len(grid))
    except BaseException:
        client.cancel(futures)
        raise

    report.phases["blocks"] = time.perf_counter() - started - sum(report.phases.values())
    if labels:
        report.objects = stitch_labels(
            client, grid, results, ids, stores["labels"].array_path(), image.stack, dims, work, token
        )
        report.cut = sum(int(results[b.name].get("cut", 0)) for b in grid)
        report.extent = max(int(results[b.name].get("extent", 0)) for b in grid)
        warn_reach(source, report.cut, report.extent, grid, dims)
        report.phases["merge"] = time.perf_counter() - started - sum(report.phases.values())
    build_pyramids(client, stores.values(), token)
    report.outputs = {kind: store.commit() for kind, store in stores.items()}
    work.remove()
    report.seconds = time.perf_counter() - started
    report.phases["pyramids"] = report.seconds - sum(report.phases.values())
    return report
