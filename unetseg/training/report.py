"""A run that talks: what it trains on and where it writes at the start, one line per epoch, the outcome at the end.

Lines go to the `unetseg` logger (stderr), so they read the same on a terminal and in a log file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

log = logging.getLogger("unetseg.train")

ESTIMATE_AFTER_STEPS = 5  # steps timed (after the first, which warms up) before the first estimate


def duration(seconds: float) -> str:
    """ "45 s", "12 min", "1 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# Validation scores an epoch line shows, when the module logs them (val/dsb and val/f1: instance targets).
EPOCH_SCORES = ("val/loss", "val/dice", "val/iou", "val/dice_classes", "val/dsb", "val/f1")


class RunReport(pl.Callback):
    """Log the start summary, an early estimate of the run time, one line per epoch and the end summary."""

    def __init__(self):
        self.started = self.epoch_started = 0.0
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.validation_seconds = 0.0
        self.validation_started = 0.0
        self.log_dir: str | None = None
        self.first_step = 0
        self.best_score: float | None = None  # of the monitored metric, see `monitored`
        self.validation_pixels = [0, 0]  # (foreground, all) pixels of the validation targets, for the baselines
        self.validation_counted = False  # the targets are the same every validation: counted once

    # --- start --------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        self.started = time.perf_counter()
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        split = getattr(data, "split", None) or {}
        root = getattr(data, "root", None) or "the embedded synthetic dataset"
        if split:
            pairs = len(split["train"]) + len(split["val"])
            log.info(
                "data: %d image/mask pairs in %s: %d for training, %d for validation",
                pairs,
                root,
                len(split["train"]),
                len(split["val"]),
            )
        stored = getattr(data, "stored_channels", None)
        if stored:
            counts = ", ".join(f"{count} with {channels} channel(s)" for channels, count in sorted(stored.items()))
            log.info("images: %s (data.in_channels %d)", counts, data.in_channels)
            if set(stored) == {1} and data.in_channels == 3:
                log.warning(
                    "every image is grey but data.in_channels is 3: each is repeated to RGB (3x the input work, "
                    "and the model will expect RGB); set --data.in_channels 1 unless you will predict colour images"
                )
        net = pl_module.net if hasattr(pl_module, "net") else pl_module
        config = ", ".join(f"{k} {v}" for k, v in getattr(net, "config", {}).items() if k in ("depth", "width"))
        parameters = sum(p.numel() for p in net.parameters())
        log.info("network: %s (%s), %.2f M parameters", type(net).__name__, config, parameters / 1e6)
        device = trainer.strategy.root_device
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        log.info(
            "run folder: %s; device: %s%s (%d process(es)), precision %s",
            Path(self.log_dir or trainer.default_root_dir),
            device,
            threads,
            trainer.world_size,
            trainer.precision,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_step = trainer.global_step
        self.on_train_epoch_start(trainer, pl_module)  # Lightning skips that hook when it resumes mid-epoch
        if trainer.is_global_zero:
            resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
            log.info(
                "training: %s epochs of %d steps (%d steps in all%s)",
                trainer.max_epochs,
                trainer.num_training_batches,
                self.total_steps(trainer),
                resumed,
            )

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int:
        return int(trainer.estimated_stepping_batches)

    # --- during ---------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_started = time.perf_counter()
        self.losses = []
        self.validation_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index: int) -> None:
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index: int) -> None:
        self.step_times.append(time.perf_counter() - self.step_started)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))
        if trainer.is_global_zero and len(self.step_times) == ESTIMATE_AFTER_STEPS + 1:
            per_step = sum(self.step_times[1:]) / ESTIMATE_AFTER_STEPS
            remaining = self.total_steps(trainer) - trainer.global_step
            log.info(
                "estimate: %.2f s per step, about %s for the %d steps left (validation comes on top; "
                "the epoch lines refine it)",
                per_step,
                duration(per_step * remaining),
                remaining,
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_started = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_index: int, dataloader_idx=0) -> None:
        target = batch.get("target") if isinstance(batch, dict) else None
        if self.validation_counted or trainer.sanity_checking or target is None:
            return
        self.validation_pixels[0] += int((target > 0).sum())  # foreground as val/dice counts it: any class > 0
        self.validation_pixels[1] += int(target.numel())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation_seconds += time.perf_counter() - self.validation_started
            self.validation_counted = self.validation_counted or self.validation_pixels[1] > 0

    def baselines(self) -> dict[str, float] | None:
        """val/dice of the trivial predictions on the validation pixels: every pixel foreground, every pixel
        background (0 as torchmetrics scores it, with no true positive); None before a validation."""
        foreground, pixels = self.validation_pixels
        if not pixels:
            return None
        return {"all foreground": 2 * foreground / (foreground + pixels), "all background": 0.0}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self.epoch_started
        metrics = trainer.callback_metrics
        scores = "  ".join(f"{key} {float(metrics[key]):.4f}" for key in EPOCH_SCORES if key in metrics)
        loss = f"train/loss {sum(self.losses) / len(self.losses):.4f}  " if self.losses else ""
        name, mode = self.monitored(trainer)
        if name in metrics:
            previous = self.best(trainer)
            candidates = [float(metrics[name]), self.best_score, previous[0] if previous else None]
            choose = max if mode == "max" else min
            self.best_score = choose(value for value in candidates if value is not None)
        best_text = f"  (best {name} {self.best_score:.4f})" if self.best_score is not None else ""
        steps_done = trainer.global_step - self.first_step
        elapsed = time.perf_counter() - self.started
        remaining = self.total_steps(trainer) - trainer.global_step
        eta = f"  ETA {duration(elapsed / steps_done * remaining)}" if steps_done and remaining > 0 else ""
        log.info(
            "epoch %d/%s  step %d  %s (validation %s)  %s%s%s%s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            trainer.global_step,
            duration(seconds),
            duration(self.validation_seconds),
            loss,
            scores,
            best_text,
            eta,
        )

    # --- end ----------------------------------------------------------------------------------------

    def compare_with_baselines(self, trainer: pl.Trainer, best: float | None) -> None:
        """Log the trivial baselines beside the model's best val/dice; warn when the model does not beat them."""
        baselines = self.baselines()
        name = self.monitored(trainer)[0]
        if baselines is None or name != "val/dice" or best is None:
            return
        foreground, pixels = self.validation_pixels
        log.info(
            "trivial baselines on the validation pixels (%.0f%% foreground): val/dice %s; the model's best %.4f",
            100 * foreground / pixels,
            ", ".join(f"{kind} {score:.4f}" for kind, score in baselines.items()),
            best,
        )
        kind, score = max(baselines.items(), key=lambda item: item[1])
        if foreground and best <= score:  # with no foreground to find, every Dice is 0
            log.warning(
                "the model's best val/dice %.4f does not beat predicting every pixel %s (%.4f): it has learnt "
                "nothing the pixel counts do not give; train longer (a larger budget), or check the masks",
                best,
                kind.removeprefix("all "),
                score,
            )

    @staticmethod
    def best_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
        """The first ModelCheckpoint that monitors a metric: the one whose `best.ckpt` the summary names."""
        return next(
            (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None), None
        )

    @classmethod
    def monitored(cls, trainer: pl.Trainer) -> tuple[str, str]:
        """(metric, "max" or "min") the best checkpoint is chosen by; val/dice, max without one."""
        callback = cls.best_checkpoint_callback(trainer)
        return (callback.monitor, callback.mode) if callback is not None else ("val/dice", "max")

    @classmethod
    def best(cls, trainer: pl.Trainer) -> tuple[float, str] | None:
        """(score, path) of the best checkpoint of the first ModelCheckpoint that monitors a metric."""
        callback = cls.best_checkpoint_callback(trainer)
        if callback is None or callback.best_model_score is None:
            return None
        return float(callback.best_model_score), callback.best_model_path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
            reason = "stopped at the time limit (trainer.max_time)"
        elif trainer.max_epochs is not None and trainer.current_epoch < trainer.max_epochs:
            reason = "stopped early"
        else:
            reason = "finished"
        planned = self.total_steps(trainer)
        done = trainer.global_step
        per_step = f" at {sum(self.step_times) / len(self.step_times):.2f} s per step" if self.step_times else ""
        log.info(
            "%s after %s: %d of the %d planned steps (%.0f%% of the plan)%s, %d epochs",
            reason,
            duration(time.perf_counter() - self.started),
            done,
            planned,
            100 * done / max(planned, 1),
            per_step,
            trainer.current_epoch,
        )
        best = self.best(trainer)
        if best:
            log.info("best %s %.4f: %s", self.monitored(trainer)[0], *best)
        self.compare_with_baselines(trainer, best[0] if best else self.best_score)
        folder = Path(self.log_dir or trainer.default_root_dir)
        last = [c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
        for name, path in (
            ("last checkpoint", last[0] if last else None),
            ("curves", folder / "curves.png"),
            ("metrics", folder / "metrics.csv"),
            ("config", folder / "config.yaml"),
        ):
            if path and Path(path).is_file():
                log.info("%s: %s", name, path)
