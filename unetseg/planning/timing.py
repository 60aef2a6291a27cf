"""Timing training steps on this machine: what `unetseg-plan` chooses a network and batch by.

Each candidate is timed as it would train (forward, loss, backward, AdamW; bfloat16 autocast
where the plan uses it) on random tiles, and the data side (augmentation, targets, border
weights) on the tiles the survey kept, so the plan's estimate is this machine's, not a table's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from unetseg.io import Normalization
from unetseg.planning.survey import DataSummary
from unetseg.training.augment import Augmentation, build_transform
from unetseg.training.data import TileDataset, pad_sample
from unetseg.training.losses import SegmentationLoss


def training_device() -> torch.device:
    """The device `accelerator: auto` trains on: the first GPU when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Candidate:
    width: int
    batch_size: int
    step_seconds: float  # network forward + backward + optimiser step
    data_seconds: float  # preparing the batch's tiles

    @property
    def seconds(self) -> float:
        return self.step_seconds + self.data_seconds


def _median_time(function, repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    def run():
        function()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it inside the timing

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_data(summary: DataSummary, tile: int, targets: str, tiles: int = 8, validation: bool = False) -> float:
    """Seconds to prepare one tile (augmentation, targets, border weights) from the kept samples."""
    samples = [pad_sample(sample, tile) for sample in summary.samples] if not validation else summary.samples
    dataset = TileDataset(
        samples,
        Normalization(),
        tile,
        targets,
        length=None if validation else tiles,
        transform=None if validation else build_transform(Augmentation()),
        border_weights=targets == "boundary",
    )
    count = min(tiles, len(dataset))
    return _median_time(lambda: [dataset[i] for i in range(count)], repeats=2) / count


def time_step(
    net: torch.nn.Module,
    batch_size: int,
    tile: int,
    classes: int,
    bf16: bool,
    steps: int = 2,
    device: torch.device = torch.device("cpu"),
) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW) on random tiles."""
    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss = SegmentationLoss(classes, 1.0).to(device)
    images = torch.rand(batch_size, net.in_channels, tile, tile, device=device)
    target = torch.randint(0, max(classes, 2), (batch_size, tile, tile), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss(net(images), target, None)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    net.train()
    return _median_time(step, repeats=steps, device=device)


def time_forward(net: torch.nn.Module, tile: int, bf16: bool, device: torch.device = torch.device("cpu")) -> float:
    """Seconds of one validation forward pass of a single tile."""
    net = net.to(device).eval()
    images = torch.rand(1, net.in_channels, tile, tile, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return _median_time(lambda: net(images), repeats=2, device=device)
