"""The network as prediction runs it: a copy in eval mode with BatchNorm folded into the convolutions before it,
instance norms run as group norms, in channels-last layout, optionally compiled. The caller's network is never
changed.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be
multiplied into the convolution's weights and bias (as ONNX Runtime and TensorRT do): one pass
over each feature map less, the same result to float32 rounding. An instance norm is a group
norm with one channel per group; PyTorch's instance norm copies a channels-last input into the
standard layout and back, its group norm keeps the layout, so the oneDNN convolutions around it
stay channels-last (1.6x faster forward of the 3-D U-Net of configs/unet3d.yaml, BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm", "inference_copy", "instance_as_group_norm", "memory_format_of"]

log = logging.getLogger(__name__)

# One prepared copy per network, rebuilt when any of its tensors changes (see `_state_key`).
_copies: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


FOLDABLE = {(nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d)}  # a convolution and the norm after it


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution of its dimension (Conv2d and
    BatchNorm2d, Conv3d and BatchNorm3d) in an nn.Sequential, in place.

    The convolution takes the BatchNorm's scale and shift; the BatchNorm becomes nn.Identity.
    Only the Sequential pattern is folded (the U-Net's blocks, SMP's Conv2dReLU), so a
    BatchNorm that is used elsewhere too is never touched. Returns the number folded.
    """
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if (type(conv), type(norm)) in FOLDABLE and norm.track_running_stats:
                if conv.training or norm.training:
                    raise ValueError(
                        "fold_batchnorm needs a model in eval mode (BatchNorm uses its running statistics)"
                    )
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
                folded += 1
    return folded


INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def instance_as_group_norm(model: nn.Module) -> int:
    """Replace every instance norm that normalises by the input's own statistics (no running statistics) by the
    equal `nn.GroupNorm` with one channel per group, in place; its affine weights are shared. Returns the number."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, INSTANCE_NORMS) and not child.track_running_stats:
                group = nn.GroupNorm(child.num_features, child.num_features, child.eps, affine=child.affine)
                if child.affine:
                    group.weight, group.bias = child.weight, child.bias
                setattr(parent, name, group)
                replaced += 1
    return replaced


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """The channels-last format of a network: `channels_last_3d` where it has 3-D weights, else `channels_last`."""
    volumetric = any(parameter.ndim == 5 for parameter in model.parameters())
    return torch.channels_last_3d if volumetric else torch.channels_last


def _state_key(model: nn.Module, *options) -> tuple:
    """What the prepared copy depends on: every parameter and buffer (identity, storage, in-place version)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return (*options, tuple((id(t), t.data_ptr(), t._version) for t in tensors))


def inference_copy(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """A copy of `model` for prediction: eval mode, BatchNorm folded, instance norms as group norms, channels-last
    (`memory_format_of`: 2-D or 3-D) if asked, compiled if asked.

    Networks without convolution weights (e.g. `OnnxPredictor`) and networks that cannot be
    copied are returned as they are, in eval mode. The copy is cached per network and rebuilt
    when its weights change (training steps, `load_state_dict`, `.to(device)`), so predicting
    many images pays for it once.
    """
    if not any(parameter.ndim in (4, 5) for parameter in model.parameters()):
        return model.eval()
    key = _state_key(model, channels_last, compile)
    cached = _copies.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        prepared = copy.deepcopy(model)
    except Exception as error:  # a network holding something uncopyable (a file, a session): run it unchanged
        log.debug("cannot copy %s for prediction (%s); running it as it is", type(model).__name__, error)
        return model.eval()
    prepared.eval().requires_grad_(False)
    folded = fold_batchnorm(prepared)
    instance_as_group_norm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=memory_format_of(prepared))
    if compile:
        prepared = torch.compile(prepared)
    log.debug(
        "prediction copy of %s: %d BatchNorm folded, channels_last=%s", type(model).__name__, folded, channels_last
    )
    _copies[model] = (key, prepared)
    return prepared
