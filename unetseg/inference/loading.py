"""A model for prediction from any model file: a training checkpoint, an ONNX export or a bioimage.io package,
run by PyTorch or by ONNX Runtime.

The one place that knows which loader reads which file type, so `models/` never imports `export/`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from unetseg.inference.volume import spatial_dims
from unetseg.io.files import cache_folder
from unetseg.models.checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, load_net
from unetseg.spec import InputSpec

__all__ = ["BACKENDS", "load_predictor"]

BACKENDS = ("torch", "onnxruntime")

log = logging.getLogger(__name__)


def load_predictor(
    path: str | Path, device: str | torch.device | None = None, backend: str = "torch"
) -> tuple[nn.Module, InputSpec]:
    """Load a model for prediction and the input spec it was trained with: (model in eval mode, spec).

    .ckpt/.pt/.pth are training checkpoints (see `read_checkpoint`); .onnx files written by
    unetseg-export run through ONNX Runtime (`unetseg.export.onnx.OnnxPredictor`) with the spec
    stored in the file, and so do bioimage.io packages (.zip) written by unetseg-export. Raises
    CheckpointError naming the file when it cannot be used.

    backend "onnxruntime" runs a checkpoint's network through ONNX Runtime too: it is exported
    once (`unetseg-export`'s ONNX, float32) into the cache folder under the checkpoint's hash and
    reused. 2-D networks only; ONNX models run there whatever the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
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
    if backend == "onnxruntime" and suffix in CHECKPOINT_SUFFIXES:
        model = _onnxruntime_copy(path, model, spec)
    if device is not None:
        model = model.to(device)
    return model.eval(), spec


def _onnxruntime_copy(path: Path, model: nn.Module, spec: InputSpec) -> nn.Module:
    """The checkpoint's network run by ONNX Runtime: exported once into the cache, keyed by the file's hash."""
    if spatial_dims(model) == 3:
        raise CheckpointError(f"{path}: a 3-D model; --backend onnxruntime runs 2-D models (use --backend torch)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    exported = cache_folder() / "onnx" / f"{path.stem}-{digest}.onnx"
    try:
        from unetseg.export.onnx import export_net

        if exported.is_file():
            try:
                return _load_onnx(exported)[0]
            except CheckpointError as error:  # damaged in the cache (a disk error, an edit): made again
                log.warning("%s; exporting it again", error)
        export_net(model, exported, input_spec=spec)  # under a temporary name, then renamed: never half there
    except (ImportError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: cannot run it with ONNX Runtime ({error})") from None
    return _load_onnx(exported)[0]


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
