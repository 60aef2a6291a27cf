"""Segmentation losses: cross-entropy (optionally weighted per pixel) plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn


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
