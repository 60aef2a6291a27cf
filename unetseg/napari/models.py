"""The model the widgets of one viewer share: chosen in the Segment widget, loaded once, replaced by its
fine-tuned successor (Fine-tune widget), which the Segment widget then predicts with."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from psygnal import Signal
from torch import nn

from unetseg.inference.loading import load_predictor
from unetseg.inference.volume import spatial_dims
from unetseg.spec import InputSpec, label_settings
from unetseg.weights import MODELS, available_models, model_path

__all__ = ["LoadedModel", "ModelSession", "default_device", "load_model", "model_choices", "session"]

MODEL_SUFFIXES = "*.ckpt *.pt *.pth *.zip *.onnx"  # checkpoints, bioimage.io packages, ONNX exports


def default_device() -> str:
    """Where the widgets run models: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_choices() -> list[str]:
    """The shipped models installed, by name (`unetseg.weights`)."""
    return available_models()


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict.

    Args:
        net: the network in eval mode on `device` (an ONNX Runtime module for .onnx and .zip files).
        spec: its input spec (channels, normalisation, targets, stored post-processing).
        choice: what was chosen to get it: a shipped model's name or a model file.
        description: what the widgets show, e.g. "nuclei, fine-tuned 60 s on 1 pair".
        device: "cpu" or "cuda".
        tuned: fine-tuned in this session (the Segment widget predicts again with it).
    """

    net: nn.Module
    spec: InputSpec
    choice: str
    description: str
    device: str
    tuned: bool = False

    @property
    def dims(self) -> int:
        """2 for an image model (stacks plane by plane), 3 for a volume model."""
        return spatial_dims(self.net)

    @property
    def trainable(self) -> bool:
        """True for PyTorch weights (checkpoints, shipped models); ONNX Runtime models have none to train."""
        return any(True for _ in self.net.parameters())

    def label_defaults(self) -> dict[str, Any]:
        """threshold, seed_threshold, min_size and tta: the model's stored settings, else the defaults."""
        return {**label_settings(self.spec.postprocess), "tta": self.spec.tta}


def model_file(choice: str | Path) -> Path:
    """The file of a model choice: a shipped model's name, or a checkpoint, ONNX or bioimage.io file."""
    return model_path(str(choice)) if str(choice) in MODELS else Path(choice)


def load_model(choice: str | Path, device: str | None = None) -> LoadedModel:
    """Load a shipped model by name, or a model file (`load_predictor`); CheckpointError names a file it can't use."""
    device = device or default_device()
    net, spec = load_predictor(model_file(choice), device)
    description = str(choice) if str(choice) in MODELS else Path(choice).name
    return LoadedModel(net, spec, str(choice), description, device)


class ModelSession:
    """The model of one viewer's widgets; `changed` is emitted with the new model whenever it is replaced.

    `corrections` holds the labels layers fine-tuned on (weakly): predictions never overwrite them.
    """

    changed = Signal(object)

    def __init__(self):
        self.model: LoadedModel | None = None
        self.corrections: weakref.WeakSet = weakref.WeakSet()

    def set(self, model: LoadedModel) -> None:
        """Make `model` the current one and tell the widgets."""
        self.model = model
        self.changed.emit(model)

    def current(self, choice: str) -> LoadedModel | None:
        """The current model if it was loaded (or fine-tuned) from `choice`, else None (load it)."""
        return self.model if self.model is not None and self.model.choice == str(choice) else None


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session(viewer: Any) -> ModelSession:
    """The model session of a viewer, made on first use and dropped with the viewer."""
    if viewer not in _SESSIONS:
        _SESSIONS[viewer] = ModelSession()
    return _SESSIONS[viewer]
