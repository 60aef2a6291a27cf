"""Model files: the one reader and writer of checkpoints, and the rules for trusting them.

Every checkpoint unetseg reads goes through `read_checkpoint`: `torch.load(weights_only=True)`,
so a file that holds Python objects is refused and nothing in it runs. Networks are rebuilt
from the description a checkpoint carries only for classes on an allow-list, with arguments
checked against bounds before anything is allocated, and never with weights from the network
(the checkpoint's own weights follow). ONNX exports are dispatched to ONNX Runtime.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetseg.io.files import atomic_output
from unetseg.models import build_net, net_state_dict
from unetseg.spec import InputSpec, label_settings

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "ENSEMBLE_CLASS",
    "CheckpointError",
    "load_net",
    "make_ensemble",
    "load_net_weights",
    "non_finite_weights",
    "read_checkpoint",
    "resolve_model",
    "save_checkpoint",
    "slim_checkpoint",
    "store_postprocess",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
# The only networks a checkpoint may ask for: its class_path is looked up here, never imported freely.
ALLOWED_NETS = {
    "unetseg.models.unet.UNet": "unetseg.models.unet.UNet",
    "unetseg.models.UNet": "unetseg.models.unet.UNet",
    "unetseg.models.baseline.SMPUnet": "unetseg.models.baseline.SMPUnet",
    "unetseg.models.SMPUnet": "unetseg.models.baseline.SMPUnet",
}
ENSEMBLE_CLASS = "unetseg.models.ensemble.Ensemble"  # a file of K networks: "members" lists their descriptions
MAX_MEMBERS = 16
# Upper bounds of integer network arguments, checked before a network is built: a 100-byte
# file must not make us allocate gigabytes (UNet width 6000 is > 4 GB of weights).
NET_ARGUMENT_LIMITS = {
    "in_channels": 16,
    "classes": 256,
    "depth": 8,
    "width": 512,
    "encoder_depth": 5,
    "blocks_per_level": 16,
    "growth": 256,
    "layers": 16,
    "spatial_dims": 3,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or is refused; the message names the file and why."""


def resolve_model(source: str | Path) -> Path:
    """A checkpoint path, or the file of a model shipped with unetseg by name ("nuclei")."""
    path = Path(source)
    if path.is_file():
        return path
    from unetseg.weights import MODELS, model_path

    if str(source) in MODELS:
        return model_path(str(source))
    raise CheckpointError(f"{path}: no such checkpoint file (nor a shipped model: {', '.join(MODELS)})")


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a PyTorch checkpoint as tensors and plain data (weights_only); CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused below, not dispatched to torch.jit.load
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if not found:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged or another format)") from None
        hint = ""
        if found.group(1).startswith("unetseg."):
            hint = (
                "; a checkpoint from Trainer.fit in Python stores the data module's dataclasses: "
                "checkpoints written by unetseg-train hold plain data"
            )
        raise CheckpointError(
            f"{path}: refused: the checkpoint holds Python objects ({found.group(1)}), not only tensors and plain "
            f"data; loading them could run code, so only weights are loaded (weights_only=True){hint}"
        ) from None
    except Exception as error:  # zip, pickle and EOF errors of damaged or foreign files
        if "TorchScript" in str(error):
            raise CheckpointError(
                f"{path}: a TorchScript archive; TorchScript is a program, not data, so it is not "
                "loaded here: predict with the .ckpt or its .onnx export"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a unetseg checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def checked_net_description(description: Any, path: str | Path) -> dict:
    """A checkpoint's network description, refused unless its class is allowed and its arguments are in bounds."""
    if not isinstance(description, dict) or not isinstance(description.get("init_args", {}), dict):
        raise CheckpointError(f"{path}: not a unetseg checkpoint (no network description)")
    class_path = str(description.get("class_path", ""))
    if class_path not in ALLOWED_NETS:
        raise CheckpointError(
            f"{path}: refused: its network class {class_path!r} is not one of unetseg's networks "
            f"({', '.join(sorted(set(ALLOWED_NETS.values())))}); checkpoints may not choose what "
            "gets imported"
        )
    init_args = dict(description.get("init_args", {}))
    for name, limit in NET_ARGUMENT_LIMITS.items():
        value = init_args.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit):
            raise CheckpointError(f"{path}: refused: network argument {name}={value!r} is outside 1..{limit}")
    if "encoder_weights" in init_args:
        init_args["encoder_weights"] = None  # the checkpoint's weights follow: never download any
    return {"class_path": ALLOWED_NETS[class_path], "init_args": init_args}


def non_finite_weights(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinite values."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def check_finite_weights(state_dict: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or Inf: it would predict empty masks without a word."""
    broken = non_finite_weights(state_dict)
    if broken:
        raise CheckpointError(
            f"{path}: refused: {len(broken)} weight tensor(s) hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}); the training that wrote it diverged"
        )


def load_net(path: str | Path) -> tuple[nn.Module, InputSpec | None, dict]:
    """(network with its trained weights, input spec or None, hyperparameters) of a training checkpoint.

    Refuses (CheckpointError) networks that are not allowed or out of bounds, and non-finite weights.
    """
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a unetseg checkpoint (no state_dict, or no hyper_parameters)")
    check_finite_weights(checkpoint["state_dict"], path)
    description = hparams.get("net")
    members = description.get("members") if isinstance(description, dict) else None
    if isinstance(description, dict) and description.get("class_path") == ENSEMBLE_CLASS:
        if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
            raise CheckpointError(f"{path}: refused: an ensemble must list 2 to {MAX_MEMBERS} member networks")
        descriptions = [checked_net_description(member, path) for member in members]
    else:
        descriptions = [checked_net_description(description, path)]
    spec = None
    if hparams.get("input_spec"):
        try:
            spec = InputSpec.from_dict(hparams["input_spec"])
        except ValueError as error:
            raise CheckpointError(f"{path}: unusable input_spec: {error}") from None
    try:
        nets = [build_net(description) for description in descriptions]
        if len(nets) == 1:
            net = nets[0]
        else:
            from unetseg.models.ensemble import Ensemble

            net = Ensemble(nets)
        net.load_state_dict(net_state_dict(checkpoint["state_dict"]))
    except Exception as error:  # wrong keys or shapes, bad init arguments
        raise CheckpointError(f"{path}: cannot rebuild the network ({type(error).__name__}: {error})") from None
    return net, spec, hparams


def make_ensemble(sources: list[str | Path], target: str | Path) -> Path:
    """Write one model file holding the networks of `sources` (checkpoints of one recipe, e.g. the folds of a
    cross-validation), which predicts with their averaged probabilities (`unetseg.models.ensemble`).

    The members must share their input spec (channels, normalisation, targets, classes); the
    ensemble keeps the first one's, post-processing included (tune the ensemble afterwards).
    """
    if len(sources) < 2 or len(sources) > MAX_MEMBERS:
        raise CheckpointError(f"an ensemble takes 2 to {MAX_MEMBERS} checkpoints, got {len(sources)}")
    members, state, spec = [], {}, None
    for index, source in enumerate(sources):
        checkpoint = read_checkpoint(source)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{source}: not a unetseg checkpoint (no state_dict, or no hyper_parameters)")
        if hparams.get("net", {}).get("class_path") == ENSEMBLE_CLASS:
            raise CheckpointError(f"{source}: is an ensemble already; give the checkpoints of its members")
        members.append(checked_net_description(hparams.get("net"), source))
        member_spec = InputSpec.from_dict(hparams["input_spec"]) if hparams.get("input_spec") else None
        if member_spec is None:
            raise CheckpointError(f"{source}: has no input_spec; an ensemble needs one its members share")
        if spec is not None and (
            member_spec.in_channels,
            member_spec.normalization,
            member_spec.targets,
            member_spec.classes,
        ) != (spec.in_channels, spec.normalization, spec.targets, spec.classes):
            raise CheckpointError(f"{source}: its input spec differs from {sources[0]}'s; an ensemble needs one")
        spec = spec or member_spec
        state |= {
            f"net.members.{index}.{key}": value for key, value in net_state_dict(checkpoint["state_dict"]).items()
        }
    hparams = {
        "net": {"class_path": ENSEMBLE_CLASS, "members": members},
        "input_spec": spec.to_dict(),
        "ensemble_of": [str(source) for source in sources],
    }
    return save_checkpoint({"hyper_parameters": hparams, "state_dict": state}, target)


def load_net_weights(net: nn.Module, source: str | Path, adapt_head: bool = False) -> list[str]:
    """Copy the network weights of a checkpoint (a path or a shipped model name) into `net` (fine-tuning).

    adapt_head: tensors that differ from `net`'s only in their first dimension (the output classes
    of the heads) get the rows both have, and keep `net`'s fresh values in the others, as a new
    head for more classes starts from the old classes. Returns the names of the tensors adapted.
    """
    path = resolve_model(source)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a unetseg checkpoint (no state_dict)")
    check_finite_weights(checkpoint["state_dict"], path)
    weights, adapted = net_state_dict(checkpoint["state_dict"]), []
    if adapt_head:
        ours = net.state_dict()
        for name, theirs in weights.items():
            mine = ours.get(name)
            if mine is not None and theirs.shape != mine.shape and theirs.shape[1:] == mine.shape[1:]:
                rows = min(len(theirs), len(mine))
                weights[name] = mine.clone()
                weights[name][:rows] = theirs[:rows]
                adapted.append(name)
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit this network ({error})") from None
    return adapted


def slim_checkpoint(source: str | Path, target: str | Path, half: bool = True) -> Path:
    """Write the shippable part of a training checkpoint: weights and hyperparameters.

    Optimiser state, callbacks and loops are dropped; floating-point weights are stored as
    float16 when `half` (loaded back into float32 parameters), except tensors with values beyond
    float16's range (BatchNorm running variances reach 1e5), which stay float32. The result
    still loads with `SegmentationModule.load_from_checkpoint` and `unetseg-predict --checkpoint`.
    """
    checkpoint = read_checkpoint(source)
    state = {
        key: value.half() if half and value.is_floating_point() and fits_half(value) else value
        for key, value in checkpoint["state_dict"].items()
    }
    slim = {
        key: checkpoint[key]
        for key in ("pytorch-lightning_version", "hyper_parameters", "epoch", "global_step")
        if key in checkpoint
    }
    slim["state_dict"] = state
    save_checkpoint(slim, target)
    return Path(target)


def fits_half(tensor: torch.Tensor) -> bool:
    """True when every value of a floating-point tensor stays finite in float16."""
    return tensor.numel() == 0 or float(tensor.abs().max()) <= torch.finfo(torch.float16).max


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """`torch.save` atomically: into a temporary file beside `path`, flushed to disk (fsync), then renamed.

    Never a copy across filesystems, so a kill or a full disk leaves the previous file whole. The
    disk space is reserved before writing; a full disk raises OSError naming `path`.
    """
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # in memory first: a full disk then fails a plain write, with an OSError
    data = buffer.getbuffer()
    try:
        with atomic_output(path, suffix=".tmp.ckpt") as temporary, open(temporary, "wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, len(data))
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # unsupported: just write
                    raise
            handle.write(data)
    except OSError as error:
        failure = OSError(
            f"{path}: cannot write the checkpoint ({error.strerror or error}); "
            f"{'the previous one is intact' if Path(path).exists() else 'nothing was written'}"
        )
        failure.errno = error.errno
        raise failure from error
    return Path(path)


def store_postprocess(source: str | Path, target: str | Path, postprocess: dict, tta: bool = False) -> Path:
    """Write `source` to `target` (may be the same file) with `postprocess` as its input spec's
    post-processing settings (what `unetseg-tune` found) and `tta`, whether they were tuned on
    test-time-augmented probabilities; everything else is kept as it is."""
    label_settings(postprocess)  # ValueError for unknown or out-of-range settings
    checkpoint = read_checkpoint(source)
    spec = (checkpoint.get("hyper_parameters") or {}).get("input_spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{source}: has no input_spec to store post-processing settings in")
    spec = {**spec, "postprocess": dict(postprocess), "tta": tta}
    spec = InputSpec.from_dict(spec).to_dict()  # checks it round-trips
    checkpoint["hyper_parameters"]["input_spec"] = spec
    return save_checkpoint(checkpoint, target)  # never a half-written model file
