"""ImageJ/Fiji ROI sets from instance labels: one polygon ROI per object, in a .zip that Fiji's ROI Manager opens.

Each outline is the marching-squares contour of the object's mask at level 0.5 (`find_contours`
on the mask padded by one pixel), so it runs between the object's pixels and its background
neighbours: the pixels whose centres lie inside the polygon are the object's pixels. ImageJ
puts pixel (x, y)'s centre at (x + 0.5, y + 0.5), so the points are written shifted by half a
pixel, with sub-pixel precision. Needs pip install 'unetseg[rois]' (roifile).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from unetseg.io.files import atomic_output

__all__ = ["RoiSet", "object_outlines"]


def object_outlines(labels: np.ndarray, first_row: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(label, outline (N, 2) as (row, column) in image pixels) of every object in `labels` (rows, W).

    `first_row` is the image row of labels' first row. Objects with holes get their outer outline.
    """
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        mask = np.pad(labels[found] == index, 1).astype(np.uint8)
        outline = max(find_contours(mask, 0.5), key=len)
        yield index, outline - 1 + np.array([found[0].start + first_row, found[1].start])


class RoiSet:
    """ROIs gathered block by block (`add`), written as one ImageJ ROI set zip (`write`)."""

    def __init__(self):
        try:
            import roifile
        except ImportError as error:
            raise ImportError("roifile is not installed; --rois needs pip install 'unetseg[rois]'") from error
        self.roifile, self.rois = roifile, []

    def add(self, labels: np.ndarray, first_row: int = 0, z: int | None = None, plane_in_name: bool = False) -> None:
        """Add a polygon ROI for each object of `labels`, named by its label (zero-padded, so Fiji sorts
        them), at stack position `z` (0-based); `plane_in_name` appends the 1-based plane, for
        3-D objects that have an outline in each of several planes (names must be unique in a set)."""
        for label, outline in object_outlines(labels, first_row):
            points = outline[:, ::-1] + 0.5  # ImageJ (x, y) with pixel centres at +0.5
            name = f"{label:06d}-{z + 1:04d}" if plane_in_name else f"{label:06d}"
            roi = self.roifile.ImagejRoi.frompoints(points.astype(np.float32), name=name, position=z)
            self.rois.append(roi)

    def write(self, path: str | Path) -> Path:
        """Write the ROI set zip atomically; an image without objects gets an empty zip."""
        with atomic_output(path, suffix=".tmp.zip") as temporary:
            temporary.unlink()
            if self.rois:
                self.roifile.roiwrite(temporary, self.rois, mode="w")
            else:
                import zipfile

                zipfile.ZipFile(temporary, "w").close()
        return Path(path)
