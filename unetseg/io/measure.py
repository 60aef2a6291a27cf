"""Per-object measurements (`skimage.measure.regionprops_table`), gathered block by block, written as CSV;
volumes (3-D labels) measured whole by `measure_volume`.

One row per object: its label, area, centroid, bounding box and mean intensity in each input
channel (of the stored image, before any conversion or normalisation). With a known pixel
size, area and centroid are given in calibrated units too (`area_<unit>2`, `centroid_y_<unit>`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from skimage.measure import regionprops_table

from unetseg.io.files import atomic_output
from unetseg.io.source import Calibration

__all__ = ["Measurements", "measure_volume", "write_rows"]

# Units as column suffixes: OME-NGFF and NIfTI names (and ImageJ's micron) shortened.
SHORT_UNITS = {"micrometer": "um", "micron": "um", "\u00b5m": "um", "nanometer": "nm", "millimeter": "mm", "meter": "m"}
PIXEL_COLUMNS = ["label", "area", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]


class Measurements:
    """Rows of object measurements (`add` per block of labels), written as one CSV (`write`).

    Args:
        calibration: the image's pixel size; calibrated columns are added when it has one.
        stack: add the plane index column "z".
    """

    def __init__(self, calibration: Calibration = Calibration(), stack: bool = False):
        from unetseg.io.zarr import ngff_scale

        self.stack, self.rows, self.channels = stack, [], 0
        self.scale_y, self.scale_x, unit = ngff_scale(calibration)
        self.unit = SHORT_UNITS.get(unit, unit)

    def add(self, labels: np.ndarray, intensities: np.ndarray, first_row: int = 0, z: int = 0) -> None:
        """Measure the objects of `labels` (rows, W) with the stored pixels `intensities` (rows, W[, C])."""
        if intensities.ndim == 2:
            intensities = intensities[..., None]
        self.channels = intensities.shape[-1]
        table = regionprops_table(
            labels.astype(np.int64, copy=False),
            intensity_image=intensities.astype(np.float64, copy=False),
            properties=("label", "area", "centroid", "bbox", "intensity_mean"),
        )
        for i in range(len(table["label"])):
            row = {
                "label": int(table["label"][i]),
                "area": int(table["area"][i]),
                "centroid_y": float(table["centroid-0"][i]) + first_row,
                "centroid_x": float(table["centroid-1"][i]),
                "bbox_min_y": int(table["bbox-0"][i]) + first_row,
                "bbox_min_x": int(table["bbox-1"][i]),
                "bbox_max_y": int(table["bbox-2"][i]) + first_row,
                "bbox_max_x": int(table["bbox-3"][i]),
            }
            row |= {f"mean_intensity_{c}": float(table[f"intensity_mean-{c}"][i]) for c in range(self.channels)}
            if self.stack:
                row["z"] = z
            if self.unit:
                row[f"area_{self.unit}2"] = row["area"] * self.scale_y * self.scale_x
                row[f"centroid_y_{self.unit}"] = row["centroid_y"] * self.scale_y
                row[f"centroid_x_{self.unit}"] = row["centroid_x"] * self.scale_x
            self.rows.append(row)

    def columns(self) -> list[str]:
        """The CSV header: pixel columns, plane, mean intensities, calibrated columns."""
        columns = (["z"] if self.stack else []) + PIXEL_COLUMNS
        columns += [f"mean_intensity_{c}" for c in range(self.channels)]
        if self.unit:
            columns += [f"area_{self.unit}2", f"centroid_y_{self.unit}", f"centroid_x_{self.unit}"]
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


VOLUME_AXES = ("z", "y", "x")


def measure_volume(
    labels: np.ndarray, intensities: np.ndarray, spacing=(None, None, None), unit: str | None = None
) -> tuple[list[str], list[dict]]:
    """(CSV columns, one row per object) of 3-D labels (Z, Y, X) with the stored voxels
    `intensities` (Z, Y, X[, C]): label, volume in voxels, centroid and bounding box (z, y, x;
    bbox_max exclusive), mean intensity per channel; with the whole voxel `spacing` (Z, Y, X) and
    its `unit`, also the volume in unit^3 (`volume_mm3`) and the centroid in that unit."""
    if intensities.ndim == 3:
        intensities = intensities[..., None]
    channels = intensities.shape[-1]
    table = regionprops_table(
        labels.astype(np.int64, copy=False),
        intensity_image=intensities.astype(np.float64, copy=False),
        properties=("label", "area", "centroid", "bbox", "intensity_mean"),
    )
    short = SHORT_UNITS.get(unit, unit) if unit and all(spacing) else None
    columns = ["label", "volume"] + [f"centroid_{axis}" for axis in VOLUME_AXES]
    columns += [f"bbox_{end}_{axis}" for end in ("min", "max") for axis in VOLUME_AXES]
    columns += [f"mean_intensity_{c}" for c in range(channels)]
    if short:
        columns += [f"volume_{short}3"] + [f"centroid_{axis}_{short}" for axis in VOLUME_AXES]
    rows = []
    for i in range(len(table["label"])):
        row = {"label": int(table["label"][i]), "volume": int(table["area"][i])}
        row |= {f"centroid_{axis}": float(table[f"centroid-{a}"][i]) for a, axis in enumerate(VOLUME_AXES)}
        row |= {f"bbox_min_{axis}": int(table[f"bbox-{a}"][i]) for a, axis in enumerate(VOLUME_AXES)}
        row |= {f"bbox_max_{axis}": int(table[f"bbox-{a + 3}"][i]) for a, axis in enumerate(VOLUME_AXES)}
        row |= {f"mean_intensity_{c}": float(table[f"intensity_mean-{c}"][i]) for c in range(channels)}
        if short:
            row[f"volume_{short}3"] = row["volume"] * float(np.prod(spacing))
            row |= {
                f"centroid_{axis}_{short}": row[f"centroid_{axis}"] * step for axis, step in zip(VOLUME_AXES, spacing)
            }
        rows.append(row)
    return columns, rows
