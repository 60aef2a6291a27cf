"""Per-object measurements (`skimage.measure.regionprops_table`) of 2-D or 3-D labels, gathered block by
block, written as CSV.

One row per object: its label, area (volume, in 3-D), centroid, bounding box (bbox_max
exclusive) and mean intensity in each input channel (of the stored image, before any conversion
or normalisation). With a known pixel (voxel) size, the area (volume) and centroid are given in
calibrated units too (`area_<unit>2`, `volume_<unit>3`, `centroid_y_<unit>`). The unit scaling is
one multiplication per column, so the pixel and calibrated columns come from one regionprops pass.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.measure import regionprops_table

from unetseg.io.files import atomic_output
from unetseg.io.source import InputImage

__all__ = ["Measurements", "write_rows"]

# Units as column suffixes: OME-NGFF and NIfTI names (and ImageJ's micron) shortened.
SHORT_UNITS = {"micrometer": "um", "micron": "um", "\u00b5m": "um", "nanometer": "nm", "millimeter": "mm", "meter": "m"}


class Measurements:
    """Rows of object measurements (`add` per block of labels), written as one CSV (`write`).

    Args:
        scale: the pixel (voxel) size per axis, (Y, X) or (Z, Y, X); None: uncalibrated (columns in pixels only).
        unit: the unit of `scale`.
        stack: 2-D labels of a stack's planes: add the plane index column "z".
    """

    def __init__(
        self, scale: Sequence[float] | None = None, unit: str | None = None, stack: bool = False, dims: int = 2
    ):
        self.dims, self.stack, self.rows, self.channels = dims, stack and dims == 2, [], 0
        self.axes = ("z", "y", "x")[-dims:]
        self.size = "area" if dims == 2 else "volume"
        known = scale is not None and unit and all(scale)
        self.scale = tuple(float(step) for step in scale) if known else None
        self.unit = SHORT_UNITS.get(unit, unit) if known else None

    @classmethod
    def of(cls, image: InputImage, dims: int = 2) -> Measurements:
        """The collector of an input's labels: 2-D objects of its planes (`dims` 2) or 3-D objects (3)."""
        from unetseg.io.zarr import ngff_scale

        if dims == 3:
            return cls(image.spacing, image.calibration.unit, dims=3)
        scale_y, scale_x, unit = ngff_scale(image.calibration)
        return cls((scale_y, scale_x), unit, image.stack)

    def add(self, labels: np.ndarray, intensities: np.ndarray, first_row: int = 0, z: int = 0) -> None:
        """Measure the objects of `labels` (rows, ...) with the stored pixels `intensities` (rows, ...[, C]);
        `first_row` is the block's offset along the first axis, `z` the plane of 2-D labels of a stack."""
        if intensities.ndim == labels.ndim:
            intensities = intensities[..., None]
        self.channels = intensities.shape[-1]
        table = regionprops_table(
            labels.astype(np.int64, copy=False),
            intensity_image=intensities.astype(np.float64, copy=False),
            properties=("label", "area", "centroid", "bbox", "intensity_mean"),
        )
        offset = np.zeros(self.dims)
        offset[0] = first_row
        for i in range(len(table["label"])):
            row = {"label": int(table["label"][i]), self.size: int(table["area"][i])}
            for a, axis in enumerate(self.axes):
                row[f"centroid_{axis}"] = float(table[f"centroid-{a}"][i]) + offset[a]
            for a, axis in enumerate(self.axes):
                row[f"bbox_min_{axis}"] = int(table[f"bbox-{a}"][i] + offset[a])
            for a, axis in enumerate(self.axes):
                row[f"bbox_max_{axis}"] = int(table[f"bbox-{a + self.dims}"][i] + offset[a])
            row |= {f"mean_intensity_{c}": float(table[f"intensity_mean-{c}"][i]) for c in range(self.channels)}
            if self.stack:
                row["z"] = z
            if self.unit:
                row[f"{self.size}_{self.unit}{self.dims}"] = row[self.size] * float(np.prod(self.scale))
                for axis, step in zip(self.axes, self.scale):
                    row[f"centroid_{axis}_{self.unit}"] = row[f"centroid_{axis}"] * step
            self.rows.append(row)

    def columns(self) -> list[str]:
        """The CSV header: plane, pixel columns, mean intensities, calibrated columns."""
        columns = (["z"] if self.stack else []) + ["label", self.size]
        columns += [f"{name}_{axis}" for name in ("centroid", "bbox_min", "bbox_max") for axis in self.axes]
        columns += [f"mean_intensity_{c}" for c in range(self.channels)]
        if self.unit:
            columns += [f"{self.size}_{self.unit}{self.dims}"] + [f"centroid_{axis}_{self.unit}" for axis in self.axes]
        return columns

    def write(self, path: str | Path) -> Path:
        """Write the CSV atomically, rows in label order."""
        return write_rows(path, self.columns(), sorted(self.rows, key=lambda row: (row.get("z", 0), row["label"])))


def write_rows(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    """Write `rows` under the header `columns` as a CSV, atomically (never half-written)."""
    with atomic_output(path, suffix=".tmp.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)
