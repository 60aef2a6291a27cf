"""Training callbacks and the CSV logger of a run folder: learning curves redrawn at every validation,
a metrics history that survives a resume, and a `last.ckpt` that is the final state."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series of (step, value) per column of a CSVLogger metrics.csv."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def plot_curves(metrics_csv: str | Path, out: str | Path) -> Path:
    """Plot losses and validation Dice/IoU against the training step into one PNG."""
    series = read_metrics(metrics_csv)
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/loss_step", "train/loss_epoch", "val/loss"):
        if key in series:
            loss_axis.plot(*zip(*series[key]), label=key, alpha=0.5 if key.endswith("step") else 1.0)
    for key in ("val/dice", "val/iou"):
        if key in series:
            score_axis.plot(*zip(*series[key]), marker="o", label=key)
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    score_axis.set(xlabel="step", ylabel="score", ylim=(0, 1), title="validation")
    for axis in (loss_axis, score_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    partial = Path(out).with_name(Path(out).stem + ".partial.png")
    figure.savefig(partial, dpi=100)  # renamed: a viewer never sees a half-written picture
    plt.close(figure)
    os.replace(partial, out)
    return Path(out)


def trim_metrics(path: str | Path, before_step: int) -> None:
    """Drop the rows of metrics.csv logged at `before_step` or later: a resumed run logs them again."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if row.get("step") not in ("", None) and int(row["step"]) < before_step]
    if len(kept) == len(rows):
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without its deletion of an existing metrics.csv: the history is appended to."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(csv.DictReader(handle).fieldnames or [])


class HistoryCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume; `MetricsHistory` trims rows the resumed run repeats."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class MetricsHistory(pl.Callback):
    """Keep metrics.csv as one history across resumes and redraw curves.png after every validation."""

    @staticmethod
    def _csv_logger(trainer: pl.Trainer) -> CSVLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._csv_logger(trainer)
        if trainer.is_global_zero and logger is not None:
            # A fresh run in an old folder starts a new history; a resumed one keeps the rows before its step.
            trim_metrics(Path(logger.log_dir) / "metrics.csv", trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.draw(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> None:
        logger = self._csv_logger(trainer)
        if not trainer.is_global_zero or logger is None:
            return
        logger.save()  # flush what is buffered
        metrics_csv = Path(logger.log_dir) / "metrics.csv"
        if metrics_csv.is_file():
            plot_curves(metrics_csv, Path(logger.log_dir) / "curves.png")


class FinalCheckpoint(pl.Callback):
    """Write `last.ckpt` when training ends, so it holds the final step rather than the last periodic save."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)
                callback.last_model_path = str(path)
