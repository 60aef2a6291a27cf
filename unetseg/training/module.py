"""The LightningModule: loss, metrics, optimiser and the hyperparameters that let a
checkpoint rebuild its network and repeat its input normalisation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex, MulticlassF1Score

from unetseg.evaluation.metrics import instance_scores
from unetseg.inference.postprocess import to_labels
from unetseg.models import UNet, build_net, describe_net
from unetseg.models.checkpoint import (
    CheckpointError,
    checked_net_description,
    load_net_weights,
    non_finite_weights,
    read_checkpoint,
    resolve_model,
)
from unetseg.runtime.precision import channels_last
from unetseg.spec import InputSpec
from unetseg.training.losses import SegmentationLoss

if TYPE_CHECKING:  # the SMP baseline imports timm: only when it is used
    from unetseg.models.baseline import SMPUnet

SCHEDULERS = ("cosine", "plateau", "none")
log = logging.getLogger(__name__)


class SegmentationModule(pl.LightningModule):
    """Trains any network that maps (N, C, H, W) images to (N, classes, H, W) logits.

    Args:
        net: the network, e.g. `unetseg.models.UNet` or `unetseg.models.SMPUnet` (a
            `class_path` in YAML). Networks with a `config` dict are rebuilt from checkpoints.
        dice_weight: weight of the soft Dice term added to the cross-entropy.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        scheduler: "cosine" (to zero over the run, per step), "plateau" (halve when validation
            Dice stalls for `patience` validations) or "none".
        patience: validations without improvement before "plateau" lowers the rate.
        input_spec: how images were read and normalised; filled from the data module at fit
            time and saved in checkpoints. Leave it empty.
        pretrained: a checkpoint, or the name of a shipped model ("nuclei"), whose network
            weights start this training (fine-tuning); the network must have the same shape.
        adapt_head: with `pretrained` of other output classes (e.g. `targets: distance`, 4
            classes, from a `boundary` model, 3), copy the classes both have (the first ones)
            and train the others from scratch; the rest of the network must match.
        instance_metrics: when validation batches carry instance "labels" (whole images, one
            per batch) and the network gives instances (1, 3 or 4 classes), log `val/dsb` (the
            DSB score) and `val/f1` (F1 at IoU 0.5) of `to_labels` at its default settings:
            what to select checkpoints by (`monitor: val/dsb`).

    Batches are dicts with "image" (N, C, H, W), "target" (N, H, W) and optionally "weight"
    (N, H, W), the per-pixel cross-entropy weights (the U-Net border weight map).
    """

    def __init__(
        self,
        net: UNet | SMPUnet,
        dice_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        patience: int = 5,
        input_spec: dict | None = None,
        pretrained: str | None = None,
        adapt_head: bool = False,
        instance_metrics: bool = True,
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not valid; choose one of {', '.join(map(repr, SCHEDULERS))}")
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = describe_net(net)
        self.net = net
        if pretrained:
            self.load_pretrained(net, pretrained, adapt_head)
        self.classes = int(getattr(net, "classes", 0)) or self.infer_classes(net)
        self.loss = SegmentationLoss(self.classes, dice_weight)
        # Dice and IoU of the foreground (any class > 0): what matters for nuclei and binary tasks.
        self.val_metrics = MetricCollection({"dice": BinaryF1Score(), "iou": BinaryJaccardIndex()}, prefix="val/")
        self.val_class_dice = MulticlassF1Score(self.classes, average="macro") if self.classes > 1 else None
        self.val_instances: list[tuple[float, float]] = []  # (DSB score, F1) per validation image

    @staticmethod
    def load_pretrained(net: nn.Module, pretrained: str, adapt_head: bool = False) -> None:
        """Fine-tuning: copy a checkpoint's network weights; a shape mismatch is one line naming both shapes."""
        try:
            adapted = load_net_weights(net, pretrained, adapt_head)
        except CheckpointError:
            theirs = read_checkpoint(resolve_model(pretrained)).get("hyper_parameters", {}).get("net", {})
            theirs, ours = theirs.get("init_args", {}), getattr(net, "config", {})
            differ = {k: (theirs[k], ours[k]) for k in ("in_channels", "classes") if k in theirs and k in ours}
            differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
            if not differ:
                raise
            hint = ", or --model.adapt_head true to keep the classes both have and train the others afresh"
            hint = "" if "in_channels" in differ or adapt_head else hint
            raise ValueError(
                f"model.pretrained {pretrained}: its network has "
                + ", ".join(f"{k} {a}, this run's {b}" for k, (a, b) in differ.items())
                + f" (from data.in_channels / data.targets); set the data options to match it{hint}"
            ) from None
        if adapted:
            log.info("model.pretrained %s: output classes adapted in %s", pretrained, ", ".join(adapted))

    @staticmethod
    def infer_classes(net: nn.Module) -> int:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            in_channels = next(p for p in net.parameters() if p.ndim == 4).shape[1]
            classes = net(torch.zeros(1, in_channels, 64, 64)).shape[1]
        net.train(was_training)
        return classes

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location=None, **kwargs) -> SegmentationModule:
        """Rebuild the module, its network included, from a checkpoint: tensors and plain data only, and only
        networks unetseg allows (see `unetseg.models.checkpoint`). Keyword arguments override saved hyperparameters."""
        checkpoint = read_checkpoint(checkpoint_path)
        if non_finite_weights(checkpoint.get("state_dict", {})):
            log.warning("%s: some weights are NaN or infinite; the training that wrote it diverged", checkpoint_path)
        hparams = {
            key: value for key, value in checkpoint.get("hyper_parameters", {}).items() if not key.startswith("_")
        }  # LightningCLI's "_instantiator"
        description = hparams.pop("net", None)
        net = kwargs.pop("net", None) or build_net(checked_net_description(description, checkpoint_path))
        hparams.update(pretrained=None)  # the checkpoint's own weights follow
        hparams.update(kwargs)
        module = cls(net=net, **hparams)
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location) if map_location is not None else module

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def on_fit_start(self) -> None:
        volumetric = any(parameter.ndim == 5 for parameter in self.net.parameters())  # channels_last is 4-D only
        if channels_last(self.device) and not volumetric:  # NHWC convolutions: faster in oneDNN (CPU), tensor cores
            self.net.to(memory_format=torch.channels_last)  # NCHW inputs follow the weights from the first conv
        spec: InputSpec | None = getattr(self.trainer.datamodule, "input_spec", None)
        if spec is None:
            return
        in_channels = getattr(self.net, "in_channels", spec.in_channels)
        if in_channels != spec.in_channels:
            raise ValueError(
                f"the network takes {in_channels} channel(s) but data.in_channels is {spec.in_channels}; "
                "set one of them (unetseg-train links the network's to the data's)"
            )
        if spec.classes != self.classes:
            raise ValueError(
                f"the network outputs {self.classes} channel(s) but targets={spec.targets!r} need "
                f"{spec.classes}; set the network's classes to {spec.classes}"
            )
        self.hparams["input_spec"] = spec.to_dict()

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        outputs = self.net(batch["image"])
        # Deep supervision (UNet skip="nested"): one logits tensor per decoder depth in training, each scored
        # against the same target and averaged, as UNet++ trains; in eval the net returns the last one only.
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = torch.stack([self.loss(logits, batch["target"], batch.get("weight")) for logits in heads]).mean()
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(heads[0]), sync_dist=True
        )
        return loss

    def validation_step(self, batch: dict, batch_index: int) -> None:
        logits = self.net(batch["image"])
        target = batch["target"]
        self.log("val/loss", self.loss(logits, target, batch.get("weight")), batch_size=len(logits), sync_dist=True)
        predicted = (logits[:, 0] > 0).long() if self.classes == 1 else logits.argmax(dim=1)
        self.val_metrics.update(predicted > 0, target > 0)
        if self.val_class_dice is not None:
            self.val_class_dice.update(predicted, target)
        if self.hparams.instance_metrics and "labels" in batch and self.classes in (1, 3, 4):
            probs = torch.sigmoid(logits) if self.classes == 1 else torch.softmax(logits, dim=1)
            probs = probs.detach().float().cpu().numpy()
            for image_probs, labels in zip(probs, batch["labels"].cpu().numpy()):
                scores = instance_scores(to_labels(image_probs), labels)
                self.val_instances.append((scores["dsb_score"], scores["f1"]))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if self.val_class_dice is not None:
            self.log("val/dice_classes", self.val_class_dice.compute())
            self.val_class_dice.reset()
        if self.val_instances:
            dsb, f1 = np.mean(self.val_instances, axis=0)
            self.log_dict({"val/dsb": float(dsb), "val/f1": float(f1)}, prog_bar=True, sync_dist=True)
            self.val_instances = []

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "cosine":
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.hparams.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.5, patience=self.hparams.patience
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/dice"}}
        return optimizer
