"""Tuning a model's instance post-processing on annotated images, as StarDist's `optimize_thresholds`.

The model's probabilities are computed once per image; then the settings of `to_labels`
(threshold, seed_threshold, min_size) are searched one at a time over a grid, each time keeping
the others at their best so far, for a few rounds (coordinate ascent), maximising the mean DSB
score over the images. The result is stored in the checkpoint's input spec, where
`unetseg-predict --output labels` finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from unetseg.evaluation.metrics import as_instances, instance_scores
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.inference.postprocess import to_labels
from unetseg.io import read_image, read_labels
from unetseg.spec import InputSpec, label_settings

__all__ = ["SEARCH_GRID", "TuneResult", "mean_score", "predict_probabilities", "tune_postprocess"]

log = logging.getLogger(__name__)

# Values tried for each setting; None for seed_threshold means "the same as threshold".
SEARCH_GRID: dict[str, tuple] = {
    "threshold": (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
    "seed_threshold": (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "min_size": (0, 5, 10, 15, 20, 30, 45, 60),
}


@dataclass
class TuneResult:
    """The best settings, their mean DSB score, the score of the starting settings and every trial."""

    settings: dict
    score: float
    start_score: float
    trials: list[tuple[dict, float]] = field(default_factory=list)


def predict_probabilities(
    model: nn.Module, spec: InputSpec, pairs: Sequence[tuple[Path, Path]], settings: PredictSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probabilities (classes, H, W), GT instance labels (H, W)) of each (image, mask) file pair."""
    prob_settings = PredictSettings(output="prob", tiling=settings.tiling)
    results = []
    for image_path, mask_path in pairs:
        probs = predict_image(model, spec, read_image(image_path), prob_settings)
        probs = probs[None] if probs.ndim == 2 else probs  # one-class models give (H, W)
        results.append((probs, as_instances(read_labels(mask_path))))
    return results


def mean_score(cases: Sequence[tuple[np.ndarray, np.ndarray]], settings: dict) -> float:
    """Mean DSB score over (probabilities, GT labels) cases of `to_labels(probs, **settings)`."""
    return float(np.mean([instance_scores(to_labels(probs, **settings), gt)["dsb_score"] for probs, gt in cases]))


def tune_postprocess(
    cases: Sequence[tuple[np.ndarray, np.ndarray]],
    start: dict | None = None,
    grid: dict[str, Sequence] | None = None,
    rounds: int = 2,
    on_trial: Callable[[dict, float], None] | None = None,
) -> TuneResult:
    """The `to_labels` settings that maximise the mean DSB score over `cases` by coordinate ascent.

    Args:
        cases: (probabilities (classes, H, W), GT instance labels (H, W)) per image.
        start: settings to start from (default: POSTPROCESS_DEFAULTS); its score is `start_score`.
        grid: values tried per setting (default SEARCH_GRID); settings not in it stay at `start`.
        rounds: passes over the settings; stops early when a pass changes nothing.
        on_trial: called with (settings, score) after each evaluation, e.g. to log progress.

    A setting changes only when a value scores strictly higher, so ties keep the start values.
    """
    if not cases:
        raise ValueError("tuning needs at least one annotated image")
    grid = SEARCH_GRID if grid is None else grid
    best = label_settings(start)
    cache: dict[tuple, float] = {}
    trials: list[tuple[dict, float]] = []

    def score(settings: dict) -> float:
        key = tuple(sorted(settings.items(), key=lambda item: item[0]))
        if key not in cache:
            cache[key] = mean_score(cases, settings)
            trials.append((dict(settings), cache[key]))
            if on_trial is not None:
                on_trial(dict(settings), cache[key])
        return cache[key]

    start_score = best_score = score(best)
    for _ in range(rounds):
        changed = False
        for name, values in grid.items():
            for value in values:
                candidate = {**best, name: value}
                candidate_score = score(candidate)
                if candidate_score > best_score + 1e-9:
                    best, best_score, changed = candidate, candidate_score, True
        if not changed:
            break
    return TuneResult(best, best_score, start_score, trials)
