"""Out-of-domain checks at prediction: does an input look like the model's training data?

Training stores a summary of its images' intensities in the input spec (`intensity_summary`);
prediction compares each input with it and with the spec's channel count (`domain_warnings`),
so a model applied to images unlike its training data says so instead of failing silently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from unetseg.io.images import to_channels
from unetseg.io.normalize import Normalization
from unetseg.io.source import native

log = logging.getLogger(__name__)

SAMPLE_SIDE = 512  # inputs are checked on a strided sample of about this many rows and columns


def strided_sample(plane: Any) -> np.ndarray:
    """Every k-th row and column of a plane (H, W[, C]), about SAMPLE_SIDE of each; cheap on memory maps."""
    step = max(1, max(plane.shape[0], plane.shape[1]) // SAMPLE_SIDE)
    return np.asarray(native(plane[::step, ::step]))


def normalized_median(image: np.ndarray, value_range: tuple[float, float], normalization: Normalization) -> float:
    """Median of an image (C, H, W) after its normalisation: low for dark-field fluorescence, high for brightfield."""
    step = max(1, max(image.shape[-2:]) // SAMPLE_SIDE)
    return float(np.median(normalization.apply(image[:, ::step, ::step], value_range)))


def intensity_summary(
    images: Sequence[np.ndarray], ranges: Sequence[tuple[float, float]], normalization: Normalization
) -> dict:
    """What training images look like: the 1st-99th percentile spread of their (low, high) percentile values
    and of their normalised medians, and the share of grey images (RGB with equal channels included), as plain
    data for the input spec."""
    if not images:
        return {}
    lows, highs = np.array([r[0] for r in ranges], float), np.array([r[1] for r in ranges], float)
    medians = np.array([normalized_median(image, r, normalization) for image, r in zip(images, ranges)])
    spread = lambda values: [round(float(v), 6) for v in np.percentile(values, [1, 99])]
    grey = float(np.mean([is_grey(image) for image in images]))
    summary = {"images": len(images), "low": spread(lows), "high": spread(highs), "median": spread(medians)}
    return {**summary, "grey": round(grey, 3)}


def is_grey(image: np.ndarray) -> bool:
    """True for one channel, or RGB channels that are all equal (grey stored as RGB), on a strided sample."""
    step = max(1, max(image.shape[-2:]) // SAMPLE_SIDE)
    sample = image[:, ::step, ::step]
    return len(sample) == 1 or bool(np.all(sample == sample[:1]))


def stored_channels(plane: Any) -> int:
    """Channels of a plane as stored (alpha not counted)."""
    return 1 if plane.ndim == 2 else min(int(plane.shape[-1]), 3)


CONVERSIONS = {(1, 3): "the grey channel repeated 3 times", (3, 1): "the mean of the RGB channels"}


def domain_warnings(
    plane: Any, in_channels: int, normalization: Normalization, intensity: dict
) -> list[tuple[str, str]]:
    """(kind, reason) pairs saying why a plane (H, W[, C]) is unlike the training data of a model: channel
    count, intensity range, normalised brightness. Empty when it looks alike (or the model stored no summary)."""
    warnings = []
    if plane.ndim == 3 and plane.shape[-1] not in (1, 3, 4):
        return warnings  # not an image the reader takes: it says so, naming the file
    channels = stored_channels(plane)
    # A model trained mostly on grey images stored as RGB (DSB2018's fluorescence) expects grey repeated.
    expected = channels == 1 and in_channels == 3 and intensity.get("grey", 0.0) >= 0.5
    if channels != in_channels and not expected:
        conversion = CONVERSIONS.get((channels, in_channels), "a conversion")
        reason = f"has {channels} channel(s) but the model was trained on {in_channels}: it was given {conversion}"
        warnings.append(("channels", reason))
    if not intensity:
        return warnings
    image = to_channels(strided_sample(plane), in_channels)
    value_range = normalization.range(image)
    low, high = intensity["high"]
    if not 0.5 * low <= value_range[1] <= 2.0 * high:
        reason = (
            f"its bright pixels ({normalization.high} percentile {value_range[1]:.4g}) are far from the training "
            f"images' ({low:.4g} to {high:.4g}): another bit depth or exposure"
        )
        warnings.append(("intensity", reason))
    median = normalized_median(image, value_range, normalization)
    low, high = intensity["median"]
    if not low - 0.1 <= median <= high + 0.1:
        reason = (
            f"its normalised median brightness {median:.2f} is outside the training images' ({low:.2f} to "
            f"{high:.2f}): another kind of image (brightfield, EM, fluorescence)"
        )
        warnings.append(("brightness", reason))
    return warnings


class DomainReport:
    """Warns once per kind of out-of-domain input (naming the first file) and counts the others."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def check(self, path: Any, plane: Any, spec: Any) -> None:
        """Check one input plane against an `InputSpec`; log the first warning of each kind."""
        for kind, reason in domain_warnings(plane, spec.in_channels, spec.normalization, spec.intensity):
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if self.counts[kind] == 1:
                log.warning("%s: %s; check the results, the model may not fit such images", path, reason)

    def summary(self) -> list[str]:
        """One line per kind seen more than once."""
        return [f"{n - 1} more input(s) with the same {kind} warning" for kind, n in self.counts.items() if n > 1]
