"""Writers of prediction outputs: masks, probabilities and instance labels into TIFF, NIfTI, OME-Zarr or PNG,
ROIs and measurements.

Every writer takes the probabilities of one model run as they stream out of the tiled engine
(`band`), so one pass writes several outputs, for 2-D and 3-D models alike: a 2-D model's
bands are rows of one plane (each plane of a stack in turn), a 3-D model's are slabs of planes
of the one volume. Masks and probabilities go band by band into a memory-mapped TIFF or an
OME-Zarr array (NIfTI: a scratch memory map, written as NIfTI when complete, with the input's
affine and header). Labels are made block by block (`unetseg.inference.labeling.BlockLabeler`,
blocks of rows of a plane or of planes of a volume) and painted into a uint32 scratch map
(narrowed to uint16 when they fit) or a zarr array, so memory never holds a whole plane or
volume; each block's objects also go to the ROI set and the measurements. Everything is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.inference.labeling import BlockLabeler
from unetseg.inference.overlay import write_png
from unetseg.inference.postprocess import to_mask
from unetseg.io.files import hold, remove_stale_folders
from unetseg.io.registry import output_container
from unetseg.io.source import InputImage, native
from unetseg.io.tiff import atomic_memmap, release_pages
from unetseg.runtime.profiling import stage
from unetseg.spec import InputSpec

__all__ = ["FORMATS", "OUTPUTS", "OutputWriter", "layout", "open_writers"]

OUTPUTS = ("mask", "prob", "labels")
COPY_ROWS = 1024  # rows per step when a scratch map is copied (narrowed) into its file: bounded memory
FORMATS = ("tiff", "ome-zarr")
DTYPES = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}
SCRATCH_PREFIX = ".scratch."  # hidden folders of scratch maps beside the outputs


def layout(kind: str, spec: InputSpec, image: InputImage) -> tuple[tuple, np.dtype, str]:
    """(shape, dtype, ImageJ axes) of output `kind` of `image`: ([Z,] [C,] H, W), the classes of
    probabilities after Z as ImageJ orders hyperstacks; labels are made as uint32."""
    planes, height, width = len(image.planes), image.height, image.width
    classes = spec.classes if kind == "prob" and spec.classes > 1 else 0
    shape = ((planes,) if image.stack else ()) + ((classes,) if classes else ()) + (height, width)
    axes = (image.plane_axis if image.stack else "") + ("C" if classes else "") + "YX"
    return shape, np.dtype(DTYPES[kind]), axes


class OutputWriter:
    """One output kind of one image or volume, written from probability bands.

    Args:
        kind: "mask", "prob" or "labels".
        target: the TIFF, PNG, NIfTI, *.ome.zarr image, or `IMAGE.zarr/labels/NAME` to write; None
            keeps the output in memory (`close` returns it).
        spec, image: the model's input spec and the opened input.
        options: `PredictSettings.label_options`: threshold (of masks too), seed_threshold, min_size.
        stack: an ExitStack that removes partial files if the prediction fails.
        rois, measurements: collectors (`RoiSet`, `Measurements`) fed with each block's objects.
        dims: the model's spatial dims: 2 (bands of rows of each plane) or 3 (slabs of planes of
            the volume, labelled in 3-D with its voxel size).
        block_rows, context: of the labels' blocks (`BlockLabeler`); None: `block_geometry`.
    """

    def __init__(
        self,
        kind: str,
        target: Path | None,
        spec: InputSpec,
        image: InputImage,
        options: dict,
        stack: ExitStack,
        rois: Any = None,
        measurements: Any = None,
        dims: int = 2,
        block_rows: int | None = None,
        context: int | None = None,
    ):
        self.kind, self.spec, self.image, self.options = kind, spec, image, dict(options)
        self.threshold = self.options.pop("threshold")
        self.target = Path(target) if target is not None else None
        self.rois, self.measurements = rois, measurements
        self.dims, self.block_rows, self.context = dims, block_rows, context
        self.shape, dtype, self.axes = layout(kind, spec, image)
        self.container = "memory" if target is None else output_container(self.target)
        self.next_label = 1
        self.labeler: BlockLabeler | None = None
        self.stack = stack
        if self.container in ("memory", "png"):  # PNGs are written whole by `close`
            self.out = np.zeros(self.shape, dtype)
        elif self.container == "ome-zarr":
            from unetseg.io.zarr import OmeZarrWriter

            self.store = OmeZarrWriter(
                self.target, self.shape, dtype, self.axes.lower(), image.calibration, label=kind != "prob"
            )
            stack.callback(self.store.abort)
            self.out = self.store.array
        elif kind == "labels" or self.container == "nifti":  # a scratch map, written into place by `close`
            self.out = self._scratch(dtype)
        else:
            kwargs = image.calibration.tiff_kwargs(self.axes, dtype)
            self.out = stack.enter_context(atomic_memmap(self.target, self.shape, dtype, **kwargs))

    def _scratch(self, dtype: np.dtype) -> np.memmap:
        """A memory-mapped array of the output's shape in a hidden folder beside the target, removed on exit.

        The folder is locked while in use; scratch folders of killed runs (unlocked) are removed first.
        """
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_folders(self.target.parent, f"{SCRATCH_PREFIX}*")
        folder = self.stack.enter_context(tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self.target.parent))
        self.stack.callback(os.close, hold(folder))  # runs before the folder is removed
        return np.lib.format.open_memmap(Path(folder) / f"{self.kind}.npy", "w+", dtype, self.shape)

    def _index(self, item: int, start: int, stop: int) -> tuple:
        """Where rows start..stop of plane `item` (2-D) or planes start..stop of the volume (3-D) go in `out`."""
        if self.dims == 3:
            return (slice(start, stop),)
        return ((item,) if self.image.stack else ()) + (Ellipsis, slice(start, stop), slice(None))

    def _put(self, item: int, start: int, stop: int, value: np.ndarray) -> None:
        with stage("write"):
            self.out[self._index(item, start, stop)] = value
            release_pages(self.out)

    def start(self, item: int) -> None:
        """Called before the bands of plane `item` (2-D models) or of the volume (3-D models, item 0)."""
        if self.kind == "labels":
            shape = self.image.shape if self.dims == 3 else (self.image.height, self.image.width)
            spacing = self.image.spacing
            self.labeler = BlockLabeler(
                shape,
                lambda first, labels: self._paint(item, first, labels),
                self.threshold,
                self.options,
                block_rows=self.block_rows,
                context=self.context,
                first_label=self.next_label,
                spacing=spacing if self.dims == 3 and all(spacing) else None,
            )

    def band(self, item: int, start: int, stop: int, probs: np.ndarray) -> None:
        """Write (labels: gather) the probabilities (classes, stop - start, ...) of rows (planes) start..stop."""
        if self.kind == "mask":  # uint8 bands are masks already, thresholded on the device
            with stage("post-process"):
                mask = probs if probs.dtype == np.uint8 else to_mask(probs, self.threshold, self.spec.targets)
            self._put(item, start, stop, mask)
        elif self.kind == "prob":
            value = probs[0] if probs.shape[0] == 1 else probs
            self._put(item, start, stop, np.moveaxis(value, 0, 1) if self.dims == 3 and value.ndim == 4 else value)
        else:
            with stage("post-process"):
                self.labeler.add(start, stop, probs)

    def end(self, item: int) -> None:
        """Called after the bands of plane (volume) `item`."""
        if self.labeler is not None:
            with stage("post-process"):
                self.next_label = self.labeler.finish()
            self.labeler = None

    def plane(self, z: int) -> np.ndarray:
        """The output of plane z ([classes,] H, W), read back (for overlays)."""
        return np.asarray(self.out[z] if self.image.stack else self.out[...])

    def _paint(self, item: int, first: int, labels: np.ndarray) -> None:
        """Write a block's owned objects (0 elsewhere keeps what earlier blocks wrote) and feed the collectors."""
        stop = first + labels.shape[0]
        step = 1 if self.dims == 3 else len(labels)  # a volume's block is painted plane by plane: no block copies
        for top in range(first, stop, step):
            part = labels[top - first : top - first + step]
            current = np.asarray(self.out[self._index(item, top, top + len(part))])
            self._put(item, top, top + len(part), np.where(part > 0, part, current))
        if self.dims == 3:  # an object's outline in each of its planes; its 3-D measurements
            if self.rois is not None:
                for z, plane in enumerate(labels, start=first):
                    self.rois.add(plane, z=z, plane_in_name=True)
            if self.measurements is not None:
                self.measurements.add(labels, native(self.image.planes[first:stop]), first)
            return
        if self.rois is not None:
            self.rois.add(labels, first, item if self.image.stack else None)
        if self.measurements is not None:
            self.measurements.add(labels, native(self.image.planes[item][first:stop]), first, item)

    def _final_dtype(self) -> np.dtype:
        """The stored dtype: labels narrowed to uint16 where they fit, other outputs as made."""
        if self.kind == "labels" and self.next_label - 1 < 2**16:
            return np.dtype(np.uint16)
        return self.out.dtype

    def close(self) -> Path | np.ndarray:
        """Finish the output: rename it into place (TIFF, OME-Zarr, NIfTI, PNG), or return the array kept in
        memory; labels are narrowed to uint16 where they fit (not in OME-Zarr, whose arrays are made before)."""
        dtype = self._final_dtype()
        if self.container in ("memory", "png"):
            out = self.out.astype(dtype, copy=False)
            return write_png(self.target, out) if self.container == "png" else out
        if self.container == "ome-zarr":
            return self.store.commit()
        if self.container == "nifti":
            from unetseg.io.nifti import write_nifti

            voxels = self.out if dtype == self.out.dtype else _copy_rows(self.out, self._scratch(dtype))
            spacing = tuple(1.0 if step is None else float(step) for step in self.image.spacing)
            return write_nifti(self.target, voxels, like=self.image.nifti, spacing=spacing)
        if self.kind == "labels":
            kwargs = self.image.calibration.tiff_kwargs(self.axes, dtype)
            with atomic_memmap(self.target, self.shape, dtype, **kwargs) as out:
                _copy_rows(self.out, out)
        return self.target


def _copy_rows(source: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = source (converting its dtype), COPY_ROWS rows at a time, releasing both maps' pages."""
    width = source.shape[-1]
    flat_in, flat_out = source.reshape(-1, width), out.reshape(-1, width)
    for start in range(0, flat_in.shape[0], COPY_ROWS):
        flat_out[start : start + COPY_ROWS] = flat_in[start : start + COPY_ROWS]
        release_pages(flat_out)
        release_pages(flat_in)
    return out


def open_writers(
    kinds: tuple[str, ...],
    targets: dict[str, Path | None],
    spec: InputSpec,
    image: InputImage,
    options: dict,
    stack: ExitStack,
    rois: Any = None,
    measurements: Any = None,
    dims: int = 2,
) -> list[OutputWriter]:
    """One `OutputWriter` per output kind (its arguments); the labels writer feeds the ROI set and measurements."""
    collectors = {"rois": rois, "measurements": measurements}
    return [
        OutputWriter(
            kind, targets[kind], spec, image, options, stack, dims=dims, **(collectors if kind == "labels" else {})
        )
        for kind in kinds
    ]
