"""What keeps a training run's files sound: atomic checkpoint writes, a stop at the first
non-finite loss, and never a non-finite checkpoint. (The metrics history that survives a resume is
`unetseg.training.callbacks.HistoryCSVLogger`.)

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin): every checkpoint is written beside its
  target, flushed to disk and renamed (`unetseg.models.checkpoint.save_checkpoint`). Lightning's own
  writer stages the file in the temp folder and copies it when the run folder is on another
  filesystem, so a kill during the copy left a 0-byte `last.ckpt`. It also refuses to write
  weights holding NaN or Inf.
- `FiniteLoss` (a Callback): stops training with `NonFiniteTrainingError` at the first NaN or
  infinite loss, before its backward pass can spread it into the weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unetseg.models.checkpoint import non_finite_weights, save_checkpoint

__all__ = ["AtomicCheckpointIO", "FiniteLoss", "NonFiniteTrainingError"]

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss or weights; the message says where."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic in the run folder itself and refusing non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the best there is
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        broken = non_finite_weights(checkpoint.get("state_dict", {}))
        if broken:
            raise NonFiniteTrainingError(
                f"{path}: not written: {len(broken)} weight tensor(s) hold NaN or infinite values "
                f"({', '.join(broken[:3])}) at step {checkpoint.get('global_step')}; training diverged "
                "(lower --model.lr, check the data)"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, path)


class FiniteLoss(pl.Callback):
    """Stop at the first NaN or infinite training loss, naming the step, epoch and batch.

    Checked before the backward pass, so the weights of the last good step are untouched (and
    `AtomicCheckpointIO` never writes non-finite ones). Under DDP all processes stop together.
    """

    def __init__(self) -> None:
        self.batch_index, self.names = -1, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.batch_index = batch_idx
        self.names = sorted(set(batch.get("name", []))) if isinstance(batch, dict) else []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = loss.detach().float().cpu().item() if loss.numel() == 1 else math.nan
            raise NonFiniteTrainingError(
                f"training stopped: the loss is {value} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {self.batch_index} of the epoch{self.tiles_from()}); no checkpoint "
                "was written from it. Lower --model.lr, or look for broken images (warnings above name files with "
                "NaN/Inf)"
            )

    def tiles_from(self) -> str:
        """The images of the batch (", tiles from a, b"), when the data name them."""
        if not self.names:
            return ""
        return ", tiles from " + ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
