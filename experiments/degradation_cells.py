"""One cell of the degradation study (experiments/degradation.py): its data, training and measurements."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from torch import nn

from experiments.study import count_flops
from unetseg import SegmentationDataModule, UNet
from unetseg.training.augment import Augmentation
from unetseg.training.losses import SegmentationLoss

log = logging.getLogger("degradation")

STREAM_SEED = 10_000  # the tile stream of seed s is drawn after torch.manual_seed(STREAM_SEED + s)
PROBE_SEED = 99_999  # the fixed batch on which every net's gradients are measured


_DATA: dict[tuple, tuple] = {}  # per process: the data module, validation tiles and probe batch


def study_data(settings: dict) -> tuple[SegmentationDataModule, list, tuple[torch.Tensor, torch.Tensor], float]:
    """(data module, validation tiles, probe batch, Dice of predicting all foreground), read once per process."""
    key = tuple(sorted((k, str(v)) for k, v in settings.items()))
    if key not in _DATA:
        data = SegmentationDataModule(
            root=settings["data"],
            in_channels=1,
            targets="foreground",
            tile_size=settings["tile_size"],
            val_tile_size=settings["val_tile_size"],
            batch_size=settings["batch_size"],
            tiles_per_epoch=settings["batch_size"] * 64,
            num_workers=0,
            seed=0,
            augmentation=Augmentation(),
        )
        data.setup("fit")
        tiles = validation_tiles(data, settings["val_tiles"])
        torch.manual_seed(PROBE_SEED)
        probe = [batch for batch, _ in zip(tile_stream(data), range(settings["probe_batches"]))]
        probe_batch = torch.cat([image for image, _ in probe]), torch.cat([target for _, target in probe])
        truth = sum(float((target > 0).sum()) for _, target in tiles)
        pixels = sum(target.numel() for _, target in tiles)
        _DATA[key] = data, tiles, probe_batch, 2 * truth / max(truth + pixels, 1.0)
    return _DATA[key]


def tile_stream(data: SegmentationDataModule):
    """Training batches (image, target) without end, drawn from torch's global generator."""
    while True:
        for batch in data.train_dataloader():
            yield batch["image"], batch["target"]


def validation_tiles(data: SegmentationDataModule, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed tiles spread evenly over the held-out images' tile grid."""
    indices = np.linspace(0, len(data.val_set) - 1, min(count, len(data.val_set))).round().astype(int)
    tiles = [data.val_set[int(i)] for i in dict.fromkeys(indices)]
    return [(tile["image"][None], tile["target"][None]) for tile in tiles]


def saved_activation_bytes(net: nn.Module, image: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()  # one count per storage: views share it
        return tensor

    net = copy.deepcopy(net).train()  # the forward updates batch-norm statistics: not those of the net studied
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(image)
    return sum(saved.values())


def dice_score(net: nn.Module, tiles) -> float:
    """Foreground Dice pooled over all validation tiles (sigmoid > 0.5)."""
    net.eval()
    overlap = total = 0.0
    with torch.no_grad():
        for image, target in tiles:
            predicted = net(image)[:, 0] > 0
            truth = target > 0
            overlap += float((predicted & truth).sum())
            total += float(predicted.sum() + truth.sum())
    net.train()
    return 2 * overlap / max(total, 1.0)


def layer_gradient_norms(net: nn.Module, loss_fn: nn.Module, batch) -> tuple[list[str], list[float]]:
    """(names, L2 norms) of the weight gradient of every convolution, in forward order, on one batch.

    Measured on a copy in training mode, so batch norm uses batch statistics as in training and
    the studied net's running statistics are untouched.
    """
    net = copy.deepcopy(net).train()
    image, target = batch
    loss_fn(net(image), target).backward()
    names, norms = [], []
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.weight.grad is not None:
            names.append(name)
            norms.append(float(module.weight.grad.norm()))
    return names, norms


def bottleneck_ratio(names: list[str], norms: list[float], depth: int) -> float:
    """log10 of the gradient norm at the bottleneck over that at the top decoder level (geometric means).

    The bottleneck is the layer farthest from the loss whatever the long skips do; a large negative
    value means gradients shrink on their way down, i.e. they vanish.
    """
    values = np.log10(np.maximum(norms, 1e-30))
    bottom = [v for n, v in zip(names, values) if n.startswith(f"down.{depth - 1}.")]
    top = [v for n, v in zip(names, values) if n.startswith(f"up.{depth - 1}.")]
    return float(np.mean(bottom) - np.mean(top)) if bottom and top else math.nan


def curve_summary(losses: list[float], last_fraction: float, points: int = 100) -> dict:
    """Final loss, start loss, the last quarter's fitted change, the step where 90% of the fall is done,
    and the curve as at most `points` chunk means (step, loss)."""
    values = np.asarray(losses, dtype=float)
    count = len(values)
    final = float(values[-max(1, round(count * last_fraction)) :].mean())
    start = float(values[: max(1, count // 50)].mean())
    quarter = values[-max(2, count // 4) :]
    slope = np.polyfit(np.arange(len(quarter)), quarter, 1)[0] if len(quarter) > 1 else 0.0
    chunks = np.array_split(np.arange(count), min(points, count))
    curve = [(int(chunk[-1]) + 1, float(values[chunk].mean())) for chunk in chunks]
    fall = start - final
    steps_to_90 = next((step for step, loss in curve if loss <= final + 0.1 * fall), None) if fall > 0 else None
    return {
        "final_loss": final,
        "start_loss": start,
        "last_quarter_change": float(slope * len(quarter)),
        "steps_to_90": steps_to_90,
        "curve": curve,
    }


def build_net(block: str, norm: str, blocks_per_level: int, seed: int, settings: dict) -> UNet:
    """The grey one-class U-Net of one cell, its initial weights set by `seed`."""
    torch.manual_seed(seed)
    return UNet(
        in_channels=1,
        classes=1,
        depth=settings["depth"],
        width=settings["width"],
        block=block,
        norm=norm,
        blocks_per_level=blocks_per_level,
        layers=settings["dense_layers"],
    )


def run_cell(block: str, norm: str, blocks_per_level: int, seed: int, settings: dict) -> dict:
    """Train one network and measure it; returns the cell's JSON-ready result."""
    started, cpu_started = time.time(), time.process_time()
    data, tiles, probe, _ = study_data(settings)
    net = build_net(block, norm, blocks_per_level, seed, settings)
    loss_fn = SegmentationLoss(classes=1)
    cost = settings["cost_tile_size"]
    result = {
        "block": block,
        "norm": norm,
        "blocks_per_level": blocks_per_level,
        "seed": seed,
        "params": sum(p.numel() for p in net.parameters()),
        "gflops": count_flops(net, 1, cost) / 1e9,
        "activation_mb": saved_activation_bytes(net, torch.zeros(1, 1, cost, cost)) / 2**20,
    }
    names, result["grad_init"] = layer_gradient_norms(net, loss_fn, probe)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=1e-4)
    # Training consumes no random numbers (no dropout), so the tiles depend on the seed alone.
    torch.manual_seed(STREAM_SEED + seed)
    losses, cpu_seconds, diverged_at = [], 0.0, None
    for step, (image, target) in zip(range(settings["steps"]), tile_stream(data)):
        step_started = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target)
        if not torch.isfinite(loss):
            diverged_at = step
            break
        loss.backward()
        optimizer.step()
        cpu_seconds += time.process_time() - step_started
        losses.append(loss.item())
    result.update(curve_summary(losses, settings["last_fraction"]) if losses else {"final_loss": math.nan})
    result["diverged_at"] = diverged_at
    if diverged_at is not None:
        result["final_loss"] = math.nan  # a diverged run has no final loss; counted apart in the report
    result["val_dice"] = dice_score(net, tiles)
    _, result["grad_trained"] = layer_gradient_norms(net, loss_fn, probe)
    result["layers"] = names
    result["grad_ratio_init"] = bottleneck_ratio(names, result["grad_init"], settings["depth"])
    result["grad_ratio_trained"] = bottleneck_ratio(names, result["grad_trained"], settings["depth"])
    result["cpu_ms_per_step"] = cpu_seconds / max(len(losses), 1) * 1e3
    result["seconds"] = time.time() - started
    result["cpu_seconds"] = time.process_time() - cpu_started
    return result


def cell_key(block: str, norm: str, blocks_per_level: int, seed: int) -> str:
    return f"{block} norm={norm} blocks={blocks_per_level} seed={seed}"
