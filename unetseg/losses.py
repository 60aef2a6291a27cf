"""Segmentation losses (cross-entropy + Dice) and the U-Net paper's border weight map."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn


def border_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Ronneberger et al. (2015), eq. 2: w = 1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background.

    d1 and d2 are the distances to the nearest and second-nearest instance, so the thin
    background gaps between touching objects weigh most. Class balancing (w_c) is left to
    the Dice term. Returns float32 (H, W); all ones with fewer than two instances.
    """
    ids = np.unique(labels)
    ids = ids[ids > 0]
    weights = np.ones(labels.shape, dtype=np.float32)
    if len(ids) < 2:
        return weights
    nearest = np.full(labels.shape, np.inf, dtype=np.float32)
    second = np.full(labels.shape, np.inf, dtype=np.float32)
    for label in ids:
        distance = ndimage.distance_transform_edt(labels != label).astype(np.float32)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    background = labels == 0
    weights[background] += w0 * np.exp(-((nearest[background] + second[background]) ** 2) / (2 * sigma**2))
    return weights


class SegmentationLoss(nn.Module):
    """Cross-entropy plus soft Dice: BCE + Dice for one class, CE + Dice for several.

    Args:
        classes: output channels of the network (1 means binary, sigmoid).
        dice_weight: weight of the Dice term; 0 gives plain (weighted) cross-entropy.

    `forward(logits (N, classes, H, W), target (N, H, W) integer, weight (N, H, W) or None)`:
    `weight` multiplies the cross-entropy per pixel (the border weight map).
    """

    def __init__(self, classes: int = 1, dice_weight: float = 1.0):
        super().__init__()
        self.classes = classes
        self.dice_weight = dice_weight
        self.dice = DiceLoss(mode="binary" if classes == 1 else "multiclass", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes == 1:
            cross_entropy = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
        else:
            cross_entropy = F.cross_entropy(logits, target.long(), reduction="none")
        if weight is not None:
            cross_entropy = cross_entropy * weight
        loss = cross_entropy.mean()
        if self.dice_weight:
            dice_target = target.unsqueeze(1).float() if self.classes == 1 else target.long()
            loss = loss + self.dice_weight * self.dice(logits, dice_target)
        return loss
