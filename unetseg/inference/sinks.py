"""Writers of prediction outputs: masks, probabilities and instance labels into TIFF or OME-Zarr, ROIs and measurements.

Every writer takes the probability bands of one model run (`band`), so one pass writes
several outputs. Masks and probabilities go band by band into a memory-mapped TIFF or an
OME-Zarr array. Labels are made block by block (`unetseg.inference.labeling.BlockLabeler`)
and painted into a uint32 scratch map (narrowed to uint16 when they fit) or a zarr array, so
memory never holds a whole plane; each block's objects also go to the ROI set and the
measurements. Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.inference.labeling import CONTEXT_ROWS, BlockLabeler, block_rows_for
from unetseg.inference.overlay import PNG_SUFFIXES, write_png
from unetseg.inference.postprocess import to_mask
from unetseg.io.source import InputImage, native
from unetseg.io.tiff import atomic_memmap, release_pages
from unetseg.io.zarr import is_zarr_target
from unetseg.spec import InputSpec

__all__ = ["FORMATS", "OUTPUTS", "OutputWriter", "layout", "open_writers"]

OUTPUTS = ("mask", "prob", "labels")
FORMATS = ("tiff", "ome-zarr")
DTYPES = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}


def layout(kind: str, spec: InputSpec, image: InputImage) -> tuple[tuple, np.dtype, str]:
    """(shape, dtype, ImageJ axes) of output `kind` of `image`; labels are made as uint32."""
    planes, height, width = len(image.planes), image.height, image.width
    classes = spec.classes if kind == "prob" and spec.classes > 1 else 0
    shape = ((planes,) if image.stack else ()) + ((classes,) if classes else ()) + (height, width)
    axes = (image.plane_axis if image.stack else "") + ("C" if classes else "") + "YX"
    return shape, np.dtype(DTYPES[kind]), axes


class OutputWriter:
    """One output kind of one image, written from probability bands.

    Args:
        kind: "mask", "prob" or "labels".
        target: the TIFF, *.ome.zarr image, or `IMAGE.zarr/labels/NAME` to write; None keeps
            the output in memory (`close` returns it).
        spec, image: the model's input spec and the opened input.
        options: `PredictSettings.label_options`: threshold (of masks too), seed_threshold, min_size.
        stack: an ExitStack that removes partial files if the prediction fails.
        rois, measurements: collectors (`RoiSet`, `Measurements`) fed with each block's objects.
        block_rows, context: of the labels' blocks (`BlockLabeler`); None: `block_rows_for` the width.
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
        block_rows: int | None = None,
        context: int = CONTEXT_ROWS,
    ):
        self.kind, self.spec, self.image, self.options = kind, spec, image, dict(options)
        self.threshold = self.options.pop("threshold")
        self.target = Path(target) if target is not None else None
        self.rois, self.measurements = rois, measurements
        self.block_rows = block_rows or block_rows_for(image.width, context)
        self.context = context
        self.shape, dtype, self.axes = layout(kind, spec, image)
        self.zarr = target is not None and is_zarr_target(self.target)
        self.next_label = 1
        self.labeler: BlockLabeler | None = None
        self.png = target is not None and self.target.suffix.lower() in PNG_SUFFIXES
        if target is None or self.png:  # PNGs are written whole by `close`
            self.out = np.zeros(self.shape, dtype)
        elif self.zarr:
            from unetseg.io.zarr import OmeZarrWriter

            self.store = OmeZarrWriter(
                self.target, self.shape, dtype, self.axes.lower(), image.calibration, label=kind != "prob"
            )
            stack.callback(self.store.abort)
            self.out = self.store.array
        elif kind == "labels":  # uint32 scratch, narrowed into the TIFF by `close`
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=".labels.", dir=self._folder()))
            self.out = np.lib.format.open_memmap(Path(folder) / "labels.npy", "w+", np.uint32, self.shape)
        else:
            kwargs = image.calibration.tiff_kwargs(self.axes, dtype)
            self.out = stack.enter_context(atomic_memmap(self.target, self.shape, dtype, **kwargs))

    def _folder(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        return self.target.parent

    def _put(self, z: int, rows: slice, value: np.ndarray) -> None:
        """out[z, ..., rows, :] = value, for stacks and single planes alike."""
        index = ((z,) if self.image.stack else ()) + (Ellipsis, rows, slice(None))
        self.out[index] = value
        release_pages(self.out)

    def start_plane(self, z: int) -> None:
        """Called before the bands of plane z."""
        if self.kind == "labels":
            self.labeler = BlockLabeler(
                self.image.height,
                self.image.width,
                lambda first, labels: self._paint(z, first, labels),
                self.threshold,
                self.options,
                block_rows=self.block_rows,
                context=self.context,
                first_label=self.next_label,
            )

    def band(self, z: int, start: int, stop: int, probs: np.ndarray) -> None:
        """Write (or, for labels, gather) the probabilities (classes, stop - start, W) of rows start..stop."""
        if self.kind == "mask":  # uint8 bands are masks already, thresholded on the device
            mask = probs if probs.dtype == np.uint8 else to_mask(probs, self.threshold, self.spec.targets)
            self._put(z, slice(start, stop), mask)
        elif self.kind == "prob":
            self._put(z, slice(start, stop), probs[0] if probs.shape[0] == 1 else probs)
        else:
            self.labeler.add(start, stop, probs)

    def end_plane(self, z: int) -> None:
        """Called after the bands of plane z."""
        if self.labeler is not None:
            self.next_label = self.labeler.finish()
            self.labeler = None

    def plane(self, z: int) -> np.ndarray:
        """The output of plane z ([classes,] H, W), read back (for overlays)."""
        return np.asarray(self.out[z] if self.image.stack else self.out[...])

    def _paint(self, z: int, first: int, labels: np.ndarray) -> None:
        """Write a block's owned objects (0 elsewhere keeps what earlier blocks wrote) and feed the collectors."""
        rows = slice(first, first + labels.shape[0])
        index = ((z,) if self.image.stack else ()) + (rows, slice(None))
        current = np.asarray(self.out[index])
        self._put(z, rows, np.where(labels > 0, labels, current))
        if self.rois is not None:
            self.rois.add(labels, first, z if self.image.stack else None)
        if self.measurements is not None:
            self.measurements.add(labels, native(self.image.planes[z][rows]), first, z)

    def close(self) -> Path | np.ndarray:
        """Finish the output: rename it into place (TIFF, OME-Zarr), or return the array kept in memory;
        labels are narrowed to uint16 where they fit (not in OME-Zarr, whose arrays are made before)."""
        if self.target is None or self.png:
            narrow = self.kind == "labels" and self.next_label - 1 < 2**16
            out = self.out.astype(np.uint16) if narrow else self.out
            return write_png(self.target, out) if self.png else out
        if self.zarr:
            return self.store.commit()
        if self.kind == "labels":
            dtype = np.dtype(np.uint16 if self.next_label - 1 < 2**16 else np.uint32)
            kwargs = self.image.calibration.tiff_kwargs(self.axes, dtype)
            with atomic_memmap(self.target, self.shape, dtype, **kwargs) as out:
                flat_in, flat_out = self.out.reshape(-1, self.shape[-1]), out.reshape(-1, self.shape[-1])
                for start in range(0, flat_in.shape[0], 1024):
                    flat_out[start : start + 1024] = flat_in[start : start + 1024]
                    release_pages(flat_out)
                    release_pages(flat_in)
        return self.target


def open_writers(
    kinds: tuple[str, ...],
    targets: dict[str, Path | None],
    spec: InputSpec,
    image: InputImage,
    options: dict,
    stack: ExitStack,
    rois: Any = None,
    measurements: Any = None,
) -> list[OutputWriter]:
    """One writer per output kind; the first labels writer feeds the ROI set and measurements."""
    writers = []
    for kind in kinds:
        labels = kind == "labels"
        writers.append(
            OutputWriter(
                kind,
                targets[kind],
                spec,
                image,
                options,
                stack,
                rois if labels else None,
                measurements if labels else None,
            )
        )
    return writers
