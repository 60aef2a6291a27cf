"""What keeps a training run's files sound: atomic checkpoint writes, a stop at the first
non-finite loss, never a non-finite checkpoint, and a metrics history that survives a resume.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin): every checkpoint is written beside its
  target, flushed to disk and renamed (`unetseg.checkpoint.save_checkpoint`). Lightning's own
  writer stages the file in the temp folder and copies it when the run folder is on another
  filesystem, so a kill during the copy left a 0-byte `last.ckpt`. It also refuses to write
  weights holding NaN or Inf.
- `FiniteLoss` (a Callback): stops training with `NonFiniteTrainingError` at the first NaN or
  infinite loss, before its backward pass can spread it into the weights.
- `HistoryCSVLogger`: a CSVLogger that, on a resumed run, keeps the rows of metrics.csv written
  before the checkpoint it resumed from (Lightning's deletes the file).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unetseg.checkpoint import non_finite_weights, save_checkpoint

__all__ = ["AtomicCheckpointIO", "FiniteLoss", "HistoryCSVLogger", "NonFiniteTrainingError"]

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
        self.batch_index = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.batch_index = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = loss.detach().float().cpu().item() if loss.numel() == 1 else math.nan
            raise NonFiniteTrainingError(
                f"training stopped: the loss is {value} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {self.batch_index} of the epoch); no checkpoint was written "
                "from it. Lower --model.lr, or look for broken images (warnings above name files with NaN/Inf)"
            )


class _HistoryWriter(ExperimentWriter):
    """A metrics.csv writer that keeps the existing file's rows up to the step where new rows begin."""

    def _check_log_dir_exists(self) -> None:
        self._kept: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                reader = csv.DictReader(handle)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            first_step = min(int(row["step"]) for row in self.metrics)
            kept = [row for row in self._kept if row.get("step", "").isdigit() and int(row["step"]) < first_step]
            self._kept = None
            with open(self.metrics_file_path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        super().save()


class HistoryCSVLogger(CSVLogger):
    """CSVLogger for resumed runs: the rows of metrics.csv before the resumed step are kept, later ones replaced."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment
