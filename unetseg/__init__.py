"""unetseg: U-Net segmentation for microscopy and biomedical images."""

from __future__ import annotations

import importlib

__all__ = ["SMPUnet", "SegmentationDataModule", "SegmentationModule", "UNet", "predict_tiled"]
__version__ = "0.1.0"

# The public names load on first use, so `unetseg-predict` does not pay for Lightning,
# albumentations and SMP imports it never needs (hundreds of MB of resident memory).
_HOMES = {
    "SMPUnet": "unetseg.models",
    "UNet": "unetseg.models",
    "SegmentationDataModule": "unetseg.training.data",
    "SegmentationModule": "unetseg.training.module",
    "predict_tiled": "unetseg.inference",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'unetseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
