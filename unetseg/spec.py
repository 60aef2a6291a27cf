"""The input spec: what a model takes and gives (channels, normalisation, targets, classes).

It is recorded in every checkpoint (as plain data, under `hyper_parameters.input_spec`) when
training starts, and prediction reads it back to prepare images exactly as training did. This
module is the one home of what each training target means: how many output channels it has and
which of them are foreground.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unetseg.io.normalize import Normalization

TARGETS = ("foreground", "boundary", "distance", "classes")
# Output channels of each target kind; "classes" has as many as the masks' classes. "distance" is
# "boundary" plus a fourth class, each object's centre (its inner half by distance to its boundary).
TARGET_CLASSES = {"foreground": 1, "boundary": 3, "distance": 4}
INSTANCE_TARGETS = ("foreground", "boundary", "distance")  # targets from which instance labels can be made


def output_classes(targets: str, classes: int | None = None) -> int:
    """Channels a network must output for `targets` (`classes` for targets "classes")."""
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r} is not valid; choose one of {', '.join(map(repr, TARGETS))}")
    if targets == "classes":
        if classes is None or classes < 2:
            raise ValueError("targets='classes' needs classes >= 2 (the number of classes in the masks)")
        return classes
    return TARGET_CLASSES[targets]


def foreground_probability(probs: np.ndarray, targets: str) -> np.ndarray:
    """(classes, ...) probabilities -> the probability of foreground (any object), shape (...).

    One class: the sigmoid itself; boundary (background / interior / edge): interior + edge;
    distance: interior + edge + centre; several classes: 1 - background.
    """
    if targets == "boundary":
        return probs[1] + probs[2]
    if targets == "distance":
        return probs[1] + probs[2] + probs[3]
    if probs.shape[0] == 1:
        return probs[0]
    return 1.0 - probs[0]


@dataclass(frozen=True)
class InputSpec:
    """How a model's images were prepared and what it predicts.

    Args:
        in_channels: 1 (grey) or 3 (RGB); inputs are converted to it.
        normalization: the whole-image percentile normalisation.
        targets: "foreground", "boundary" or "classes" (see `unetseg.training.targets`).
        classes: output channels, consistent with `targets`.
        postprocess: instance post-processing settings tuned for this model (threshold,
            seed_threshold, min_size); empty means the defaults.
        tta: the post-processing was tuned on test-time-augmented probabilities (the 8 flips and
            quarter turns of each tile averaged, `unetseg-tune --tta`): prediction averages them
            too unless told otherwise, as nnU-Net mirrors by default.
        intensity: a summary of the training images' intensities (`unetseg.io.domain.intensity_summary`),
            against which prediction checks its inputs; empty in checkpoints made before it existed.
    """

    in_channels: int
    normalization: Normalization = field(default_factory=Normalization)
    targets: str = "foreground"
    classes: int = 1
    postprocess: dict = field(default_factory=dict)
    intensity: dict = field(default_factory=dict)
    tta: bool = False

    def __post_init__(self):
        if self.tta not in (True, False):
            raise ValueError(f"tta must be true or false, got {self.tta!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if output_classes(self.targets, self.classes) != self.classes:
            raise ValueError(f"targets {self.targets!r} with {self.classes} classes")

    @property
    def instances(self) -> bool:
        """True when instance labels can be made from this model's output."""
        return self.targets in INSTANCE_TARGETS

    def to_dict(self) -> dict:
        """Plain data, as stored in checkpoints and exported files."""
        spec = {
            "in_channels": self.in_channels,
            "normalization": self.normalization.to_dict(),
            "targets": self.targets,
            "classes": self.classes,
        }
        if self.postprocess:
            spec["postprocess"] = dict(self.postprocess)
        if self.intensity:
            spec["intensity"] = dict(self.intensity)
        if self.tta:
            spec["tta"] = True
        return spec

    @classmethod
    def from_dict(cls, spec: Any) -> InputSpec:
        """The spec stored by `to_dict`; ValueError saying what is wrong or missing."""
        required = {"in_channels", "normalization", "targets", "classes"}
        if not isinstance(spec, dict) or not required <= spec.keys():
            raise ValueError("needs in_channels, normalization, targets and classes")
        try:
            normalization = Normalization(**spec["normalization"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"bad normalization {spec['normalization']!r} ({error})") from None
        postprocess = spec.get("postprocess") or {}
        if not isinstance(postprocess, dict):
            raise ValueError(f"bad postprocess {postprocess!r}")
        intensity = spec.get("intensity") or {}
        if not isinstance(intensity, dict):
            raise ValueError(f"bad intensity {intensity!r}")
        tta = spec.get("tta", False)
        return cls(spec["in_channels"], normalization, spec["targets"], spec["classes"], postprocess, intensity, tta)


# Settings of `to_labels` that a model may store; these values when it stores none.
POSTPROCESS_DEFAULTS = {"threshold": 0.5, "seed_threshold": None, "min_size": 15}


def label_settings(stored: dict | None = None, **overrides) -> dict:
    """The `to_labels` settings: POSTPROCESS_DEFAULTS, then a model's `stored` values, then the
    `overrides` that are not None. Unknown stored keys raise ValueError naming them."""
    stored = dict(stored or {})
    unknown = sorted(stored.keys() - POSTPROCESS_DEFAULTS.keys())
    if unknown:
        raise ValueError(f"unknown post-processing settings {unknown}; known: {sorted(POSTPROCESS_DEFAULTS)}")
    settings = {**POSTPROCESS_DEFAULTS, **stored}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("threshold", "seed_threshold"):
        if settings[key] is not None and not 0.0 <= settings[key] <= 1.0:
            raise ValueError(f"{key} must be between 0 and 1, got {settings[key]!r}")
    if int(settings["min_size"]) < 0:
        raise ValueError(f"min_size must be >= 0, got {settings['min_size']!r}")
    settings["min_size"] = int(settings["min_size"])
    return settings
