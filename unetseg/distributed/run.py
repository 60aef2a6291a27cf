"""Prediction on a Dask cluster, driven from the client: the model on every worker, one image or volume block by
block (`predict_blocks`), or a folder file by file (`predict_files_on_cluster`); `predict_on_cluster` picks.

The client holds paths, block geometry, per-block counts and the label merge's tables (one integer
per object), never pixels: workers read the input, write the outputs and match the faces.

A block-wise run, in passes:

1. normalisation ranges over the whole image (per plane for a 2-D model, of the volume for a 3-D
   model, as one machine takes them): histograms of the blocks summed on the cluster for 8/16-bit
   inputs, else one streaming task per plane (volume);
2. every block not finished by an earlier run: probabilities of its core and halo, exactly those
   of a whole-image run (`unetseg.distributed.geometry`); mask and probabilities of the core into
   the outputs; labels of core and halo numbered per block (`unetseg.distributed.merge`);
3. labels: the faces matched (a task per block), the merge (union-find) here, every block's
   labels rewritten with their final numbers (a task per block);
4. the pyramid levels of every output, a task per chunk; then each output is committed (renamed
   into place) and the work folder removed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed, wait
from torch import nn
from tqdm import tqdm

from unetseg.distributed.cluster import connect, local_threads
from unetseg.distributed.geometry import BlockGrid, aligned_block
from unetseg.distributed.merge import merge_labels
from unetseg.distributed.store import BlockStore, WorkFolder
from unetseg.distributed.worker import (
    PLUGIN,
    BlockJob,
    ModelPlugin,
    add,
    block_histogram,
    halve_chunk,
    histogram_range,
    match_faces,
    model_info,
    predict_block,
    predict_pair,
    relabel_block,
    streamed_range,
)
from unetseg.inference.batch import PredictSummary, plan_outputs
from unetseg.inference.labeling import CONTEXT_PLANES, CONTEXT_ROWS
from unetseg.inference.pipeline import PredictSettings, open_input, output_targets
from unetseg.inference.sinks import layout
from unetseg.io.files import image_stem
from unetseg.io.registry import container
from unetseg.io.zarr import LazyPlanes
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

BLOCK_2D = 1024  # block side (Y, X) of a 2-D model's planes, rounded to the input's chunks
BLOCK_3D = (32, 256, 256)  # block (Z, Y, X) of a 3-D model's volume, rounded to the input's chunks
HALO_2D = CONTEXT_ROWS  # label context around a block: as one machine's blocks of rows have
HALO_3D = (CONTEXT_PLANES, 64, 64)
REDUCE_FAN_IN = 16  # histograms summed per task of the reduction tree


@dataclass(frozen=True)
class ClusterModel:
    """The model loaded on the workers: its input spec, its spatial dims (2 or 3), what identifies it (a resumed
    run must use the same model) and the name of its plugin on the workers (several models may be loaded)."""

    spec: InputSpec
    dims: int
    fingerprint: str
    plugin: str


def _fingerprint(checkpoint: Path | None, model: nn.Module | None) -> str:
    """A model file's path, size and time; or a hash of a network's weights."""
    if checkpoint is not None:
        stat = checkpoint.stat()
        return f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}:{digest.hexdigest()}"


def use_model(
    client: Client,
    model: str | Path | tuple[nn.Module, InputSpec],
    device: str = "auto",
    torch_threads: int | None = None,
) -> ClusterModel:
    """Load a model on every worker, once each (a worker plugin; workers that join later load it too).

    Args:
        client: the cluster's client.
        model: a model file every worker can read at this path (checkpoint, .onnx, bioimage.io .zip), or a
            (network, input spec) pair, sent to the workers pickled.
        device: "auto" (each worker's GPU when it has one, else its CPU), "cpu" or "cuda".
        torch_threads: torch threads per worker (None: torch's default).
    """
    if isinstance(model, tuple):
        network, spec = model
        plugin = ModelPlugin(model=network, spec=spec, device=device, torch_threads=torch_threads)
        fingerprint = _fingerprint(None, network)
    else:
        checkpoint = Path(model).resolve()
        if not checkpoint.is_file():
            raise ValueError(f"{model}: no such model file (workers load it by this path)")
        plugin = ModelPlugin(checkpoint=str(checkpoint), device=device, torch_threads=torch_threads)
        fingerprint = _fingerprint(checkpoint, None)
    name = f"{PLUGIN}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    client.register_plugin(plugin, name=name)
    dims, spec = client.submit(model_info, name, pure=False).result()
    return ClusterModel(spec, dims, fingerprint, name)


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


def _input_chunks(planes: Any) -> tuple[int | None, int | None, int | None]:
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


def _geometry(
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
        face_axes = (0, 1, 2)
    else:
        default_block = (1, *(aligned_block(c, BLOCK_2D, n) for c, n in zip(chunks[1:], shape[1:])))
        block = (1, *_per_axis(block, default_block, "block")[1:])  # a 2-D model: every plane by itself
        halo = (0, *_per_axis(halo, (0, HALO_2D, HALO_2D), "halo")[1:]) if labels else (0, 0, 0)
        tile, overlap = settings.tiling.tile_size, settings.tiling.overlap
        tiles, overlaps = (None, tile, tile), (None, overlap, overlap)
        face_axes = (1, 2)
    if labels:
        for axis in face_axes:
            if halo[axis] < 1 and shape[axis] > block[axis]:
                raise ValueError(f"labels need a halo of at least 1 along every cut axis; got halo {halo}")
    return BlockGrid(tuple(shape), tuple(block), tuple(halo), tuple(tiles), tuple(overlaps))


def _face_axes(dims: int) -> tuple[int, ...]:
    return (0, 1, 2) if dims == 3 else (1, 2)


def _ranges(client: Client, model: ClusterModel, source: str, image: Any, grid: BlockGrid, token: str) -> list:
    """The normalisation range of every plane (2-D model) or of the volume (3-D model), computed on the cluster."""
    spec, dtype = model.spec, np.dtype(image.planes.dtype).newbyteorder("=")
    groups: list[int | None] = list(range(grid.shape[0])) if model.dims == 2 else [None]
    if dtype.kind == "u" and dtype.itemsize <= 2:  # exact histograms of the blocks, summed on the cluster
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


def _chunk_slices(shape: tuple, chunks: tuple) -> list[tuple[slice, ...]]:
    """Every chunk of an array, as slices."""
    axes = [[slice(start, min(start + c, n)) for start in range(0, n, c)] for n, c in zip(shape, chunks)]
    return list(itertools.product(*axes))


def _check_blockwise(settings: PredictSettings) -> None:
    """Raise ValueError for settings a block-wise run cannot honour."""
    if settings.format != "ome-zarr":
        raise ValueError("block-wise prediction on a cluster writes OME-Zarr outputs: add --format ome-zarr")
    unsupported = [name for name in ("rois", "measure", "overlay") if getattr(settings, name)]
    if unsupported:
        raise ValueError(f"block-wise prediction does not write {', '.join(unsupported)}; predict without them")


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
    _check_blockwise(settings)
    source, target = Path(source), Path(target)
    image = open_input(source, settings.max_pixels)  # lazily: its shape, chunks and scale, not its pixels
    if dims == 3:
        image.stack = True
    shape = image.shape
    grid = _geometry(model, settings, shape, _input_chunks(image.planes), block, halo)
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
    stores = _open_stores(settings.outputs, targets, spec, image, grid, resumed)
    labels = "labels" in settings.outputs
    lost = not all(store.resumed for store in stores.values()) or (labels and not work.ids.is_dir())
    if resumed and lost:  # an output or the labels' ids were lost: start afresh
        log.warning("%s: the interrupted run's outputs are incomplete; predicting every block again", source)
        work.remove()
        work.start(manifest)
        resumed = False
        stores = _open_stores(settings.outputs, targets, spec, image, grid, resumed)
    ids = work.open_ids(shape, grid.block, fresh=not resumed) if labels else None

    finished = work.finished() if resumed else {}
    report = BlockReport(blocks=len(grid), reused=sum(block.name in finished for block in grid))
    pending = [b for b in grid if b.name not in finished]
    ranges = work.ranges() if resumed else None
    if ranges is None and pending:
        ranges = _ranges(client, model, str(source), image, grid, token)
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
            face_axes=_face_axes(dims),
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
        report.objects = _merge(
            client, grid, results, ids, stores["labels"].array_path(), image.stack, dims, work, token
        )
        report.cut = sum(int(results[b.name].get("cut", 0)) for b in grid)
        report.extent = max(int(results[b.name].get("extent", 0)) for b in grid)
        _warn_reach(source, report, grid, dims)
        report.phases["merge"] = time.perf_counter() - started - sum(report.phases.values())
    _pyramids(client, stores.values(), token)
    report.outputs = {kind: store.commit() for kind, store in stores.items()}
    work.remove()
    report.seconds = time.perf_counter() - started
    report.phases["pyramids"] = report.seconds - sum(report.phases.values())
    return report


def _open_stores(
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


def _merge(
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
    axes = _face_axes(dims)
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


def _warn_reach(source: Path, report: BlockReport, grid: BlockGrid, dims: int) -> None:
    """Warn when objects reached a block's halo (labels may differ from one machine's) or came close to it."""
    halo = min(grid.halo[axis] for axis in _face_axes(dims))
    if report.cut:
        log.warning(
            "%s: %d object region(s) reached the edge of a block's halo (%s); their labels may differ from a "
            "single-machine run (never split at a block face, but touching objects in them may be merged): raise halo",
            source,
            report.cut,
            grid.halo,
        )
    elif report.extent > halo / 2:
        log.warning(
            "%s: the largest object region spans %d pixels, over half the halo (%d); larger ones would be cut at "
            "block borders: consider a larger halo",
            source,
            report.extent,
            halo,
        )


def _pyramids(client: Client, stores: Sequence[BlockStore], token: str) -> None:
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
    summary = PredictSummary()
    todo = []
    for source, target in pairs:
        if not overwrite and all(path.exists() for path in output_targets(source, target, settings).values()):
            summary.skipped.append(source)
        else:
            todo.append((source, target))
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
        _check_blockwise(settings)
    threads = local_threads(cluster) if isinstance(cluster, str) else None
    with connect(cluster) if isinstance(cluster, str) else nullcontext(cluster) as client:
        if announce is not None:
            announce(client.dashboard_link)
        on_cluster = use_model(client, model, device, threads)
        settings.check(on_cluster.spec)
        if not single:
            return predict_files_on_cluster(client, on_cluster, pairs, settings, overwrite, progress)
        summary = PredictSummary()
        for source, target in pairs:
            if not overwrite and all(path.exists() for path in output_targets(source, target, settings).values()):
                summary.skipped.append(source)
                continue
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
