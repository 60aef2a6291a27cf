"""Segmentation networks: plain `nn.Module`s returning logits (N, classes, H, W)."""

from unetseg.models.baseline import SMPUnet
from unetseg.models.unet import UNet

__all__ = ["SMPUnet", "UNet"]
