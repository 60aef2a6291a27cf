"""Fold ensembles, as nnU-Net's: K networks trained on K folds, predicting with averaged probabilities.

`Ensemble` is a plain network for the tiled engine: it returns logits whose activation (sigmoid
for one class, softmax for several, as the engine applies it) is the mean of its members'
probabilities: logit(mean p) and log(mean p). So every path that predicts with one network (2-D
and 3-D, TTA, every output and container) predicts with an ensemble unchanged, at K times the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Ensemble"]

EPSILON = 1e-7  # probabilities clamped away from 0 and 1 before logit / log: finite logits


class Ensemble(nn.Module):
    """K networks with the same input and output channels; `forward` gives the logits of their mean probability.

    Args:
        members: the networks (eval mode is the caller's, as for any network).
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 networks, got {len(members)}")
        dims = {int(getattr(member, "spatial_dims", 2)) for member in members}
        if len(dims) != 1:
            raise ValueError(f"the networks of an ensemble must have the same spatial dims, got {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.spatial_dims = dims.pop()

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the members' probabilities (N, classes, ...)."""
        total = None
        for member in self.members:
            logits = member(x)
            probs = logits.float().sigmoid() if logits.shape[1] == 1 else torch.softmax(logits.float(), dim=1)
            total = probs if total is None else total + probs
        return total / len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.probabilities(x).clamp(EPSILON, 1 - EPSILON)
        return torch.logit(probs) if probs.shape[1] == 1 else probs.log()
