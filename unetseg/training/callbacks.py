"""Training callbacks: learning curves written next to the checkpoints after fit."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import matplotlib

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
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return Path(out)


class SaveCurves(pl.Callback):
    """After fit, draw curves.png from the CSV logger's metrics.csv into the run folder."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        metrics_csv = Path(log_dir) / "metrics.csv"
        if metrics_csv.is_file():
            plot_curves(metrics_csv, Path(log_dir) / "curves.png")
