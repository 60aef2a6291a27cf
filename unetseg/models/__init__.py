"""Segmentation networks: plain `nn.Module`s returning logits (N, classes, H, W), and how a
checkpoint describes and rebuilds them."""

from __future__ import annotations

import importlib

from torch import nn

from unetseg.models.unet import UNet

__all__ = ["SMPUnet", "UNet", "build_net", "describe_net", "net_state_dict"]


def __getattr__(name: str):
    # The SMP baseline loads segmentation_models_pytorch (and timm) only when it is used.
    if name == "SMPUnet":
        from unetseg.models.baseline import SMPUnet

        return SMPUnet
    raise AttributeError(f"module 'unetseg.models' has no attribute {name!r}")


def describe_net(net: nn.Module) -> dict:
    """{"class_path", "init_args"} of a network that records its `config`, else just the class."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(net, "config", {}) or {})}


def build_net(description: dict) -> nn.Module:
    """Instantiate a network from `describe_net` output; only `nn.Module` subclasses are allowed."""
    module_name, _, class_name = description["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{description['class_path']} is not a torch.nn.Module class")
    return cls(**description.get("init_args", {}))


def net_state_dict(module_state: dict) -> dict:
    """The network's weights from a SegmentationModule state dict (its keys under "net.")."""
    return {key[len("net.") :]: value for key, value in module_state.items() if key.startswith("net.")}
