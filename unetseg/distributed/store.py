"""What a block-wise run keeps on disk: the partial OME-Zarr outputs, which survive an interrupted run, and the
run's work folder (its manifest, a marker per finished block, the labels' per-block ids and face strips).

Outputs are `unetseg.io.zarr.OmeZarrWriter` images written into their hidden partial folder
(`.NAME.partial`) and renamed into place by `commit`, as on one machine; here the partial folder
is kept when its run stops, chunked by blocks, and its pyramid levels are made by the cluster
before `commit` writes the metadata. The work folder (`.STEM.blocks` beside the outputs) holds:

- `manifest.json`: what the run computes (input, model, settings, blocks); a resumed run whose
  manifest differs starts again from nothing;
- `done/BLOCK.json`: written (atomically) after every output of that block, so a block with a
  marker is finished and a block without one is predicted (again);
- `ids.zarr` and `faces/BLOCK.npz`: each block's labels (its own numbering) and its face strips.

Nothing under a final name exists before every block, the merge and the pyramids are done.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.io.source import Calibration
from unetseg.io.zarr import ZARR_SUFFIX, OmeZarrWriter

__all__ = ["BlockStore", "WorkFolder", "atomic_write"]


def zarr_module():
    """The zarr module, or an ImportError saying how to install it."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError("block-wise prediction writes OME-Zarr; pip install 'unetseg[distributed]'") from error
    return zarr


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> Any:
    """The JSON stored at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class BlockStore(OmeZarrWriter):
    """An `OmeZarrWriter` whose partial folder is reused by a resumed run, its level 0 chunked by blocks.

    Args: those of `OmeZarrWriter`, plus `chunks` (one per axis of `axes`) and `resume`: open the
    partial folder left by an earlier run when it holds an array of this shape, dtype and chunks
    (else start it afresh). Pyramid levels 1.. are arrays of the group made before `commit` (by
    `level_shapes` and the cluster); `commit` only writes the metadata and renames.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple,
        dtype: np.dtype,
        axes: str,
        calibration: Calibration,
        label: bool,
        chunks: tuple,
        resume: bool,
    ):
        path, shape, dtype, chunks = Path(path), tuple(shape), np.dtype(dtype), tuple(chunks)
        partial = path.with_name(f".{path.name}.partial")
        if resume and self._reusable(partial, shape, dtype, chunks):
            zarr = zarr_module()
            self.path, self.shape, self.axes, self.label, self.calibration = path, shape, axes, label, calibration
            inside = path.parent.name == "labels" and path.parent.parent.suffix.lower() == ZARR_SUFFIX
            self.parent = path.parent.parent if inside else None
            self.partial = partial
            self.group = zarr.open_group(str(partial), mode="r+")
            self.array = self.group["0"]
            self.resumed = True
            return
        super().__init__(path, shape, dtype, axes, calibration, label)
        self.array = self.group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0, overwrite=True)
        self.resumed = False

    @staticmethod
    def _reusable(partial: Path, shape: tuple, dtype: np.dtype, chunks: tuple) -> bool:
        """True when `partial` holds a level-0 array of this shape, dtype and chunks."""
        if not partial.is_dir():
            return False
        try:
            array = zarr_module().open_group(str(partial), mode="r")["0"]
        except Exception:  # a partial folder broken by a kill: start afresh
            return False
        return tuple(array.shape) == shape and np.dtype(array.dtype) == dtype and tuple(array.chunks) == chunks

    def level_shapes(self) -> list[tuple]:
        """Shapes of pyramid levels 1.. as `commit` makes them: y and x halved while larger than the minimum side."""
        from unetseg.io.zarr import PYRAMID_MIN_SIDE

        shapes, shape = [], self.shape
        while max(shape[-2:]) > PYRAMID_MIN_SIDE:
            shape = tuple(-(-n // 2) if a in "yx" else n for a, n in zip(self.axes, shape))
            shapes.append(shape)
        return shapes

    def create_levels(self) -> list[str]:
        """Create the (empty) arrays of pyramid levels 1.., chunked as level 0; returns their paths on disk."""
        paths = []
        for level, shape in enumerate(self.level_shapes(), start=1):
            self.group.create_array(
                str(level), shape=shape, dtype=self.array.dtype, chunks=self.array.chunks, fill_value=0, overwrite=True
            )
            paths.append(str(self.partial / str(level)))
        return paths

    def _halve(self, source: Any, level: int) -> Any:
        """Level `level`, already made by the cluster from level - 1 (every second row and column)."""
        return self.group[str(level)]

    def array_path(self) -> str:
        """Where level 0 lies on disk, for workers to open."""
        return str(self.partial / "0")


class WorkFolder:
    """The work folder of one block-wise run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done = self.path / "done"
        self.faces = self.path / "faces"
        self.ids = self.path / "ids.zarr"
        self.manifest_path = self.path / "manifest.json"
        self.ranges_path = self.path / "ranges.json"

    def manifest(self) -> dict | None:
        """The stored manifest, or None."""
        return _read_json(self.manifest_path)

    def start(self, manifest: dict) -> bool:
        """Keep this folder when it holds `manifest` (a resumed run; returns True), else empty it and write it."""
        manifest = json.loads(json.dumps(manifest))  # as stored: tuples are lists
        if self.manifest() == manifest:
            return True
        shutil.rmtree(self.path, ignore_errors=True)
        self.done.mkdir(parents=True)
        self.faces.mkdir()
        self.write_manifest(manifest)
        return False

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def ranges(self) -> list | None:
        """The normalisation ranges stored by an earlier run of this manifest, or None."""
        return _read_json(self.ranges_path)

    def write_ranges(self, ranges: list) -> None:
        atomic_write(self.ranges_path, json.dumps(ranges).encode())

    def finished(self) -> dict[str, dict]:
        """The markers of finished blocks: block name -> what its task reported."""
        finished = {}
        for marker in self.done.glob("*.json"):
            try:
                finished[marker.stem] = json.loads(marker.read_text())
            except (OSError, ValueError):  # not possible with atomic markers; predict the block again
                continue
        return finished

    def open_ids(self, shape: tuple, chunks: tuple, fresh: bool) -> str:
        """The uint32 (Z, Y, X) array of every block's own label ids (created when `fresh`); returns its path."""
        if fresh or not self.ids.is_dir():
            zarr_module().create_array(
                str(self.ids), shape=shape, dtype=np.uint32, chunks=chunks, fill_value=0, overwrite=True
            )
        return str(self.ids)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
