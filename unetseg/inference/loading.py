"""A model for prediction from any model file: a training checkpoint, an ONNX export or a bioimage.io package.

The one place that knows which loader reads which file type, so `models/` never imports `export/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unetseg.models.checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, load_net
from unetseg.spec import InputSpec

__all__ = ["load_predictor"]


def load_predictor(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, InputSpec]:
    """Load a model for prediction and the input spec it was trained with: (model in eval mode, spec).

    .ckpt/.pt/.pth are training checkpoints (see `read_checkpoint`); .onnx files written by
    unetseg-export run through ONNX Runtime (`unetseg.export.onnx.OnnxPredictor`) with the spec
    stored in the file, and so do bioimage.io packages (.zip) written by unetseg-export. Raises
    CheckpointError naming the file when it cannot be used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model, spec = _load_onnx(path)
    elif suffix == ".zip":  # a bioimage.io package written by unetseg-export: its ONNX weights and stored spec
        try:
            from unetseg.export.package_reader import load_package

            model, spec = load_package(path)
        except (ImportError, ValueError, OSError) as error:
            message = str(error).removeprefix(f"{path}: ")
            raise CheckpointError(f"{path}: cannot load the bioimage.io package ({message})") from None
    elif suffix in CHECKPOINT_SUFFIXES:
        model, spec, _ = load_net(path)
        if spec is None:
            raise CheckpointError(
                f"{path}: has no input_spec (channels and normalisation); it was saved without a "
                "SegmentationDataModule, so prediction cannot repeat its input normalisation"
            )
    else:
        raise CheckpointError(
            f"{path}: unknown model file type {suffix!r}; expected {', '.join(CHECKPOINT_SUFFIXES)}, .onnx or .zip"
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), spec


def _load_onnx(path: Path) -> tuple[nn.Module, InputSpec]:
    """An ONNX export run by ONNX Runtime, and the input spec stored in it."""
    try:
        from unetseg.export.onnx import load_onnx

        model, spec = load_onnx(path)
        if spec is None:
            raise ValueError("no input_spec in its metadata; export it with unetseg-export from a trained checkpoint")
        return model, spec
    except (ImportError, ValueError, OSError) as error:  # no onnxruntime, not an export, unreadable
        message = str(error)
        message = message[len(f"{path}: ") :] if message.startswith(f"{path}: ") else message
        raise CheckpointError(f"{path}: cannot load the ONNX model ({message})") from None
