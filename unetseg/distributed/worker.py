"""What runs on the workers: the model plugin (each worker loads the model once) and the tasks of a block-wise
run (normalisation ranges, blocks, face matching, relabelling, pyramid levels) and of a folder (one file each).

Tasks take paths and block geometry, never pixels: every worker opens the input itself (OME-Zarr,
tiled or compressed TIFF chunk by chunk, memory-mapped TIFF) and reads only its block's region,
and writes straight into the partial outputs, whole chunks only, so no two tasks write one chunk.
Every task can run twice (a worker killed mid-task has its task rerun elsewhere) with the same result.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import WorkerPlugin, get_worker
from torch import nn

from unetseg.distributed.geometry import Block
from unetseg.distributed.merge import face_pairs, face_strips, local_ids, region_reach
from unetseg.distributed.store import atomic_write, zarr_module
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import Prediction, PredictSettings, predict_file
from unetseg.inference.postprocess import to_labels, to_mask
from unetseg.inference.volume import predict_tiled, predict_volume_tiled, spatial_dims
from unetseg.io.normalize import histogram_percentiles, plane_range
from unetseg.io.registry import open_source
from unetseg.io.source import InputImage, native
from unetseg.io.volumes import volume_range, volume_to_channels
from unetseg.io.zarr import LazyPlanes
from unetseg.spec import InputSpec

__all__ = ["PLUGIN", "BlockJob", "ModelPlugin", "predict_block", "read_region"]

log = logging.getLogger(__name__)

PLUGIN = "unetseg-model"  # the plugin names on the workers start with this, followed by the model's hash


class ModelPlugin(WorkerPlugin):
    """Loads the model once on each worker (and on every worker that joins later) and keeps its inputs open.

    Args:
        checkpoint: a model file every worker can read (checkpoint, ONNX export, bioimage.io zip); or
        model, spec: a network and its input spec, sent to the workers pickled.
        device: "auto" (the worker's GPU when it has one), "cpu" or "cuda".
        torch_threads: torch's intra-op threads on each worker; None leaves torch's default.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: nn.Module | None = None,
        spec: InputSpec | None = None,
        device: str = "auto",
        torch_threads: int | None = None,
    ):
        if (checkpoint is None) == (model is None) or (model is not None and spec is None):
            raise ValueError("give a checkpoint, or a model and its input spec")
        self.checkpoint, self._model, self._spec = checkpoint, model, spec
        self.device, self.torch_threads = device, torch_threads
        self.model: nn.Module | None = None
        self.spec: InputSpec | None = None
        self.sources: dict[str, InputImage] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(model=None, sources={}, lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.checkpoint is not None:
            self.model, self.spec = load_predictor(self.checkpoint, device)
        else:
            self.model, self.spec = self._model.to(device).eval(), self._spec
        log.info("worker %s: model on %s", getattr(worker, "name", "?"), device)

    def source(self, path: str) -> InputImage:
        """The input at `path`, opened lazily once per worker (again when the file was replaced)."""
        key = f"{path}:{Path(path).stat().st_mtime_ns}"
        with self.lock:
            if key not in self.sources:
                self.sources = {key: open_source(path, max_pixels=None)}  # the client checked the size
            return self.sources[key]


def _plugin(name: str) -> ModelPlugin:
    """This worker's model plugin `name`; RuntimeError when it was not registered (or failed to load the model)."""
    plugin = get_worker().plugins.get(name)
    if plugin is None or plugin.model is None:
        raise RuntimeError(f"no model {name} on this worker: register it first (unetseg.distributed.use_model)")
    return plugin


def model_info(plugin: str) -> tuple[int, InputSpec]:
    """(spatial dims, input spec) of the model of `plugin` on this worker."""
    found = _plugin(plugin)
    return spatial_dims(found.model), found.spec


def read_region(planes: Any, z: slice, y: slice, x: slice) -> np.ndarray:
    """Voxels (Z, Y, X[, C]) of a region of lazy planes, reading only the chunks it touches, in native byte order."""
    if isinstance(planes, LazyPlanes):
        array = planes.array
        index: list[Any] = [slice(None)] * len(array.shape)
        for axis, value in planes.fixed.items():
            index[axis] = value
        plane_axis, y_axis, x_axis = planes.order[:3]
        if plane_axis is not None:
            index[plane_axis] = z
        index[y_axis], index[x_axis] = y, x
        block = np.asarray(array[tuple(index)])
        kept = [axis for axis in range(len(array.shape)) if axis not in planes.fixed]
        order = [axis for axis in planes.order if axis is not None]
        block = np.transpose(block, [kept.index(axis) for axis in order])
        if plane_axis is None:
            block = block[None][z]
        return native(block)
    return native(planes[z, y, x])


def _channels(voxels: np.ndarray, in_channels: int, source: str) -> np.ndarray:
    """(Z, Y, X[, C]) voxels as the model's channels (C, Z, Y, X), converted as training converted them."""
    return volume_to_channels(voxels, in_channels, source)


# -- normalisation ranges ---------------------------------------------------------------------------------------


def block_histogram(plugin: str, source: str, region: tuple[tuple[int, int], ...], in_channels: int) -> np.ndarray:
    """Counts of every value of a region of an 8/16-bit input, after channel conversion (`value_range`'s histogram)."""
    image = _plugin(plugin).source(source)
    voxels = read_region(image.planes, *(slice(lo, hi) for lo, hi in region))
    values = _channels(voxels, in_channels, source).reshape(-1)
    return np.bincount(values, minlength=np.iinfo(values.dtype).max + 1).astype(np.int64)


def histogram_range(low: float, high: float, *counts: np.ndarray) -> tuple[float, float]:
    """The percentile range of summed histograms (`histogram_percentiles`)."""
    return histogram_percentiles(np.sum(counts, axis=0), low, high)


def add(*arrays: np.ndarray) -> np.ndarray:
    """The sum of several histograms (one level of a reduction tree)."""
    return np.sum(arrays, axis=0)


def streamed_range(plugin: str, source: str, z: int | None, spec: InputSpec) -> tuple[float, float]:
    """The range of plane `z` (`plane_range`), or of the whole volume (`volume_range`) when z is None."""
    image = _plugin(plugin).source(source)
    if z is None:
        return volume_range(image.planes, spec.in_channels, spec.normalization, source)
    return plane_range(image.planes[z], spec.in_channels, spec.normalization, source)


# -- blocks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to predict one block (paths and numbers, no pixels).

    `plugin` names the model on the workers. `outputs` maps "mask" and "prob" to their level-0
    arrays on disk; `ids` is the labels' per-block id array (None without labels). `value_range`
    normalises the block (its plane's range for a 2-D model, the volume's for a 3-D model).
    `stack`: outputs have a leading Z axis.
    """

    plugin: str
    source: str
    block: Block
    shape: tuple[int, int, int]
    dims: int
    stack: bool
    spec: InputSpec
    settings: PredictSettings
    value_range: tuple[float, float]
    outputs: dict[str, str]
    ids: str | None
    work: str
    face_axes: tuple[int, ...]
    spacing: tuple[float, ...] | None


def _put(path: str, core: tuple[slice, ...], stack: bool, value: np.ndarray) -> None:
    """Write `value` (Z, [C,] Y, X) of a core (Z, Y, X) into the output array ([Z,] [C,] Y, X) at `path`."""
    z, y, x = core
    array = zarr_module().open_array(path, mode="r+")
    if stack:
        array[z, ..., y, x] = value
    else:  # a 2-D image: one plane, no Z axis
        array[..., y, x] = value[0]


def _predict_region(job: BlockJob, model: nn.Module, image: InputImage) -> np.ndarray:
    """Probabilities (classes, Z, Y, X) of the block's read region, tiled as the whole image is tiled."""
    spec, settings = job.spec, job.settings
    voxels = read_region(image.planes, *(slice(lo, hi) for lo, hi in job.block.region))
    normalize = partial(spec.normalization.apply, value_range=tuple(job.value_range))
    options = Prediction(model, spec, settings).engine_options  # per-axis tiles of the model's dims, TTA, ...
    channels = _channels(voxels, spec.in_channels, job.source)  # (C, Z, Y, X)
    if job.dims == 3:
        probs = predict_volume_tiled(model, channels, normalize=normalize, **options)
    else:
        probs = np.stack(
            [predict_tiled(model, channels[:, z], normalize=normalize, **options) for z in range(channels.shape[1])],
            axis=1,
        )
    if probs.shape[0] != spec.classes:
        raise ValueError(f"the model returned {probs.shape[0]} classes; its input_spec says {spec.classes}")
    return probs


def predict_block(job: BlockJob) -> dict:
    """Predict one block: its core's mask and probabilities into the outputs; its labels (core and halo) as ids of
    its own into the id array, with their face strips; then its marker. Returns what the marker says."""
    started = time.perf_counter()
    plugin = _plugin(job.plugin)
    block, spec = job.block, job.spec
    probs = _predict_region(job, plugin.model, plugin.source(job.source))
    core = probs[(slice(None), *block.core_slices("region"))]
    options = job.settings.label_options(spec)
    threshold = options.pop("threshold")
    image_core = block.core_slices()
    if "prob" in job.outputs:
        value = core[0] if core.shape[0] == 1 else np.moveaxis(core, 0, 1)  # (Z, [C,] Y, X)
        _put(job.outputs["prob"], image_core, job.stack, value)
    if "mask" in job.outputs:
        _put(job.outputs["mask"], image_core, job.stack, to_mask(core, threshold, spec.targets))
    report: dict[str, Any] = {}
    if job.ids is not None:
        labelled = probs[(slice(None), *block.labelled_slices())]
        del probs, core
        if job.dims == 3:
            labels = to_labels(labelled, threshold, spacing=job.spacing, **options)
        else:
            labels = np.stack([to_labels(labelled[:, z], threshold, **options) for z in range(labelled.shape[1])])
        ids, written, total = local_ids(labels, block.core_slices("labelled"))
        cut, extent = region_reach(labels, block, job.shape, job.face_axes)
        zarr_module().open_array(job.ids, mode="r+")[image_core] = ids[block.core_slices("labelled")]
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **face_strips(ids, block, job.shape, job.face_axes))
        atomic_write(Path(job.work) / "faces" / f"{block.name}.npz", buffer.getvalue())
        report.update(written=written, total=total, cut=cut, extent=extent)
    report["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write(Path(job.work) / "done" / f"{block.name}.json", json.dumps(report).encode())
    return report


def match_faces(work: str, name: str, neighbours: list[tuple[int, str]]) -> list[tuple[str, np.ndarray]]:
    """The id pairs of block `name` and each neighbour after it, (axis, neighbour name), across their shared face."""
    faces = Path(work) / "faces"
    with np.load(faces / f"{name}.npz") as mine:
        highs = {axis: mine[f"high{axis}"] for axis, _ in neighbours}
    pairs = []
    for axis, other in neighbours:
        with np.load(faces / f"{other}.npz") as theirs:
            pairs.append((other, face_pairs(highs[axis], theirs[f"low{axis}"])))
    return pairs


def relabel_block(ids: str, labels: str, core: tuple[slice, ...], stack: bool, lookup: np.ndarray) -> None:
    """Write a block's final labels: its own ids through `lookup`."""
    own = np.asarray(zarr_module().open_array(ids, mode="r")[core])
    _put(labels, core, stack, lookup[own])


def halve_chunk(source: str, target: str, index: tuple[slice, ...]) -> None:
    """One chunk `index` of a pyramid level: every second row and column (nearest) of the level below."""
    zarr = zarr_module()
    below = zarr.open_array(source, mode="r")
    read = (*index[:-2], *(slice(2 * s.start, 2 * s.stop) for s in index[-2:]))
    zarr.open_array(target, mode="r+")[index] = np.asarray(below[read])[..., ::2, ::2]


# -- folders ----------------------------------------------------------------------------------------------------


def predict_pair(plugin: str, source: str, target: str, settings: PredictSettings) -> tuple[str, int, float, str]:
    """Predict one file of a folder on this worker with the model of `plugin` (`predict_file`: atomic outputs):
    (status, pixels, seconds, reason), status "done" or "failed"; a failure is reported, not raised."""
    plugin = _plugin(plugin)
    started = time.perf_counter()
    try:
        pixels = predict_file(plugin.model, plugin.spec, source, target, settings)
    except Exception as error:  # one broken file must not stop the folder
        message = str(error).removeprefix(f"{source}: ")
        if not isinstance(error, (ValueError, OSError)):
            message = f"{type(error).__name__}: {message}"
        return "failed", 0, 0.0, " ".join(message.split())
    return "done", pixels, time.perf_counter() - started, ""
