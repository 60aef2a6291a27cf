"""A training folder's fingerprint, read once: image sizes, channels, dtype and intensity range; mask kind
(binary / instances / classes), object sizes and touching objects. `unetseg.planning.plan` chooses settings from it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetseg.io import ImageReadError, Normalization, find_pairs, read_image, read_labels, to_channels
from unetseg.training.data import Sample, foreground_coordinates

# The one definition of "the large objects" the plan sizes tiles and depth by (and the README states).
LARGE_PERCENTILE = 95
LARGE_DEFAULT = 32.0  # px, when the masks hold no objects


@dataclass
class DataSummary:
    """What `survey` found in a training folder."""

    root: Path
    pairs: int
    shapes: list[tuple[int, int]]
    channels: Counter  # channels as stored (alpha dropped) -> images
    colour: bool  # some image has distinct colour channels
    dtypes: Counter
    ranges: list[tuple[float, float]]  # 1st and 99.8th percentiles of each image
    mask_kind: str  # "binary", "instances" or "classes"
    classes: int  # max mask value + 1 for class masks
    extents: np.ndarray  # largest bounding-box side of every object, pixels
    diameters: np.ndarray  # equivalent-circle diameter of every object, pixels
    touching: float  # share of objects touching another one (instances only)
    read_seconds: float
    samples: list[Sample] = field(default_factory=list, repr=False)  # a few, for timing the data pipeline

    @property
    def large_objects(self) -> float:
        """The extent of the large objects, px: the LARGE_PERCENTILE-th percentile of the objects' extents."""
        return float(np.percentile(self.extents, LARGE_PERCENTILE)) if len(self.extents) else LARGE_DEFAULT

    def describe(self) -> list[str]:
        heights, widths = zip(*self.shapes)
        low, high = np.median(np.array(self.ranges), axis=0)
        channels = ", ".join(f"{count} with {c}" for c, count in sorted(self.channels.items()))
        lines = [
            f"{self.pairs} image/mask pairs in {self.root} (read in {self.read_seconds:.0f} s)",
            f"images: {min(heights)}-{max(heights)} x {min(widths)}-{max(widths)} px "
            f"(median {int(np.median(heights))} x {int(np.median(widths))}); channels: {channels}"
            f"{' (colour)' if self.colour else ' (grey)'}; dtype {', '.join(map(str, self.dtypes))}; "
            f"intensity percentiles 1/99.8: median {low:.4g} / {high:.4g}",
            f"masks: {self.mask_kind}" + (f" ({self.classes} classes)" if self.mask_kind == "classes" else ""),
        ]
        if len(self.extents):
            lines.append(
                f"objects: {len(self.extents)}, diameter median {np.median(self.diameters):.0f} px, large objects "
                f"({LARGE_PERCENTILE}th percentile of extents) {self.large_objects:.0f} px"
                + (f"; {self.touching:.0%} touch another object" if self.mask_kind == "instances" else "")
            )
        return lines


def object_stats(labels: np.ndarray, instances: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(extents, areas, touching objects) of one mask: objects by label value, or connected components."""
    objects = labels if instances else ndimage.label(labels > 0)[0]
    slices = ndimage.find_objects(objects)
    extents = np.array([max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in slices if s is not None])
    areas = np.bincount(objects.ravel())[1:]
    touched = set()
    if instances:
        for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
            contact = (a != b) & (a > 0) & (b > 0)
            touched.update(np.unique(a[contact]).tolist())
            touched.update(np.unique(b[contact]).tolist())
    return extents, areas[areas > 0], len(touched)


def mask_kind(values: list[np.ndarray], components: list[int]) -> str:
    """binary (one foreground value), classes (few values shared by many objects) or instances (one per object)."""
    if all(len(v) <= 1 for v in values):
        return "binary"
    largest = max(int(v.max()) for v in values if len(v))
    objects, distinct = sum(components), sum(len(v) for v in values)
    return "classes" if largest < 16 and objects > 1.5 * distinct else "instances"


def survey(root: str | Path, keep: int = 16) -> DataSummary:
    """Read every image/mask pair under root/images and root/masks once and summarise them.

    Raises ValueError naming the files that cannot be read or paired.
    """
    started = time.perf_counter()
    pairs = find_pairs(root)
    shapes, channels, dtypes, ranges, values, components, colour = [], Counter(), Counter(), [], [], [], False
    problems, samples, stats = [], [], {True: [], False: []}  # objects as labels / as connected components
    normalization = Normalization()
    for image_path, mask_path in pairs:
        try:
            image, labels = read_image(image_path), read_labels(mask_path)
            image = to_channels(image, 3 if image.ndim == 3 and image.shape[-1] >= 3 else 1, image_path)
        except ImageReadError as error:
            problems.append(str(error))
            continue
        if labels.shape != image.shape[1:]:
            problems.append(f"{mask_path}: mask is {labels.shape} but its image is {image.shape[1:]}")
            continue
        shapes.append(labels.shape)
        channels[len(image)] += 1
        colour = (
            colour
            or len(image) == 3
            and not (np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2]))
        )
        dtypes[image.dtype] += 1
        ranges.append(normalization.range(image))
        values.append(np.unique(labels[labels > 0]))
        components.append(ndimage.label(labels > 0)[1])
        for instances in stats:  # masks are not kept: the kind is known only once all are read
            stats[instances].append(object_stats(labels, instances))
        if len(samples) < keep:
            samples.append(Sample(image_path.stem, image, labels, ranges[-1], foreground_coordinates(labels)))
    if problems:
        raise ValueError(f"{len(problems)} of {len(pairs)} pairs cannot be used:\n  " + "\n  ".join(problems))
    kind = mask_kind(values, components)
    extents, areas, touching = zip(*stats[kind == "instances"]) if stats[True] else ([np.zeros(0)], [np.zeros(0)], [0])
    areas = np.concatenate(areas)
    return DataSummary(
        root=Path(root),
        pairs=len(shapes),
        shapes=shapes,
        channels=channels,
        colour=colour,
        dtypes=dtypes,
        ranges=ranges,
        mask_kind=kind,
        classes=max((int(v.max()) for v in values if len(v)), default=1) + 1,
        extents=np.concatenate(extents),
        diameters=np.sqrt(4 * areas / np.pi),
        touching=sum(touching) / max(len(areas), 1),
        read_seconds=time.perf_counter() - started,
        samples=samples,
    )
