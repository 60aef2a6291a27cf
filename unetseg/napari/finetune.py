"""Fine-tuning the current model on a user's corrections, with the project's own training: image and labels layer
pairs become `Sample`s of a `TileDataset` (targets, augmentation and foreground oversampling as in
unetseg-train), and `SegmentationModule` trains for a set time with Lightning, at the machine's precision
(`trainer_precision`); then the model is saved as a checkpoint or a bioimage.io package."""

from __future__ import annotations

import copy
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from unetseg.io.images import to_channels
from unetseg.io.labels import as_instances
from unetseg.io.normalize import plane_range
from unetseg.io.source import native
from unetseg.models.checkpoint import save_checkpoint
from unetseg.napari.models import LoadedModel
from unetseg.napari.predict import LayerInput, arrange, lazy
from unetseg.runtime.precision import trainer_precision
from unetseg.training.augment import Augmentation, build_transform
from unetseg.training.data import TileDataset
from unetseg.training.module import SegmentationModule
from unetseg.training.samples import Sample, foreground_coordinates, pad_sample

__all__ = ["FineTuneSettings", "LossReadout", "fine_tune", "layer_samples", "save_model", "save_package"]

STEPS_PER_EPOCH = 32  # an epoch is only a unit of bookkeeping here: training stops at the time limit


@dataclass(frozen=True)
class FineTuneSettings:
    """How long and how to fine-tune.

    Args:
        seconds: training time (wall clock), checked after every step.
        lr: AdamW learning rate, constant (a time-limited run has no schedule to anneal along).
        tile_size: side of the training tiles; crops smaller than a tile are reflect-padded.
        batch_size: tiles per step.
    """

    seconds: float = 60.0
    lr: float = 1e-3
    tile_size: int = 128
    batch_size: int = 8

    def __post_init__(self):
        if not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for name in ("tile_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def crop_offset(image: LayerInput, labels: LayerInput) -> tuple[int, int]:
    """(row, column) of the labels' first pixel in the image's pixels: a labels layer may cover a crop of the
    image, placed by its translate; both must have the same scale and the same leading (Z, T) axes."""
    if len(labels.shape) != len(image.shape) or labels.shape[:-2] != image.shape[:-2]:
        raise ValueError(
            f"labels {labels.name!r} {labels.shape} do not fit image {image.name!r} {image.shape}: "
            "give labels of the same axes (a crop in Y and X at most)"
        )
    if not np.allclose(labels.scale, image.scale):
        raise ValueError(f"labels {labels.name!r} have scale {labels.scale}, image {image.name!r} {image.scale}")
    shift = (np.asarray(labels.translate) - np.asarray(image.translate)) / np.asarray(image.scale)
    offset = np.round(shift).astype(int)
    if not np.allclose(shift, offset, atol=1e-3) or offset[:-2].any():
        raise ValueError(f"labels {labels.name!r} are not placed on the pixels of image {image.name!r} (translate)")
    row, column = int(offset[-2]), int(offset[-1])
    height, width = labels.shape[-2:]
    if row < 0 or column < 0 or row + height > image.shape[-2] or column + width > image.shape[-1]:
        raise ValueError(f"labels {labels.name!r} reach outside image {image.name!r}")
    return row, column


def layer_samples(image: LayerInput, labels: LayerInput, model: LoadedModel, tile_size: int) -> list[Sample]:
    """Training samples of an image layer and its corrected labels (the whole image or a crop).

    Every plane (2-D, or each of a stack) whose labels hold an object is one sample. Its image is
    normalised with the range of the whole plane, as prediction normalises it, so a crop trains on the
    values the model will see there. Binary labels are split into objects (`as_instances`), except for
    targets "classes", whose labels are class indices.
    """
    spec = model.spec
    if model.dims != 2:
        raise ValueError("fine-tuning trains 2-D models; this one is 3-D")
    row, column = crop_offset(image, labels)
    planes = arrange(image, dims=2).planes
    height, width = labels.shape[-2:]
    label_planes = np.asarray(lazy(labels.data)).reshape((-1, height, width))
    samples = []
    for z, plane_labels in enumerate(label_planes):
        if not plane_labels.any():
            continue
        plane = planes[z]
        value_range = plane_range(plane, spec.in_channels, spec.normalization, image.name)
        region = native(plane[row : row + height, column : column + width])
        stored_channels = 1 if region.ndim == 2 else min(region.shape[-1], 3)
        pixels = to_channels(region, spec.in_channels, image.name)
        plane_labels = plane_labels if spec.targets == "classes" else as_instances(plane_labels)
        name = f"{image.name}[{z}]" if len(label_planes) > 1 else image.name
        sample = Sample(name, pixels, plane_labels, value_range, foreground_coordinates(plane_labels), stored_channels)
        samples.append(pad_sample(sample, tile_size))
    return samples


class LossReadout(pl.Callback):
    """Reports (step, loss, seconds) after every training step, and stops the fit when `stop` is set."""

    def __init__(self, report: Callable[[int, float, float], Any] | None = None, stop: threading.Event | None = None):
        self.report, self.stop, self.started = report, stop, time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self.report is not None:
            self.report(trainer.global_step, float(loss), time.monotonic() - self.started)
        if self.stop is not None and self.stop.is_set():
            trainer.should_stop = True


def fine_tune(
    model: LoadedModel,
    samples: Sequence[Sample],
    settings: FineTuneSettings = FineTuneSettings(),
    report: Callable[[int, float, float], Any] | None = None,
    stop: threading.Event | None = None,
) -> LoadedModel:
    """A copy of `model` trained on `samples` for `settings.seconds` (or until `stop` is set).

    The network is trained by `SegmentationModule` (its loss, optimiser and weights) on a `TileDataset` of
    the samples with unetseg-train's default augmentation, on the model's device, at `trainer_precision`:
    bfloat16 mixed precision where the machine computes it natively, else float32. Returns the trained
    model in eval mode, with the same input spec (stored post-processing included).
    """
    if not model.trainable:
        raise ValueError(
            f"{model.description}: an ONNX model has no PyTorch weights to train; choose its checkpoint (.ckpt)"
        )
    if not samples:
        raise ValueError("no labelled objects to train on: the labels layers are empty")
    spec = model.spec
    net = copy.deepcopy(model.net).float().train()  # BatchNorm learns the new images' statistics
    module = SegmentationModule(
        net, lr=settings.lr, scheduler="none", input_spec=spec.to_dict(), instance_metrics=False
    )
    tiles = TileDataset(
        samples,
        spec.normalization,
        settings.tile_size,
        spec.targets,
        length=settings.batch_size * STEPS_PER_EPOCH,
        transform=build_transform(Augmentation()),
    )
    loader = DataLoader(tiles, batch_size=settings.batch_size, drop_last=True, num_workers=0)
    accelerator = "gpu" if model.device.startswith("cuda") else "cpu"
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=trainer_precision(accelerator),
        max_epochs=-1,
        max_time=timedelta(seconds=settings.seconds),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LossReadout(report, stop)],
    )
    started = time.monotonic()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.monotonic() - started
    pairs = f"{len(samples)} plane{'s' if len(samples) > 1 else ''}"
    description = f"{model.description}, fine-tuned {seconds:.0f} s on {pairs}"
    # Back to the standard memory layout (training used channels_last): the model predicts as its checkpoint will.
    tuned = module.net.eval().to(model.device, memory_format=torch.contiguous_format)
    return LoadedModel(tuned, spec, model.choice, description, model.device, tuned=True)


def save_model(model: LoadedModel, path: str | Path) -> Path:
    """Write a trainable model as a unetseg checkpoint (.ckpt, atomically): what unetseg-predict
    --checkpoint, unetseg-export and unetseg-train --model.pretrained read."""
    if not model.trainable:
        raise ValueError(f"{model.description}: an ONNX model is saved by exporting its checkpoint, not here")
    module = SegmentationModule(model.net, input_spec=model.spec.to_dict())
    checkpoint = {
        "state_dict": {key: value.detach().cpu() for key, value in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    return save_checkpoint(checkpoint, path)


def save_package(model: LoadedModel, path: str | Path) -> Path:
    """Write a trainable model as a bioimage.io package (.zip, `unetseg.export.bioimageio`; needs
    'unetseg[bioimageio]')."""
    from unetseg.export.bioimageio import export_bioimageio

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_model(model, Path(folder) / "model.ckpt")
        name = re.sub(r"[^\w\-() ]", "", f"unetseg {model.description}")  # what bioimage.io names may hold
        return export_bioimageio(checkpoint, path, name=name)
