"""Training speed: unetseg-train on DSB2018 tiles against a bare float32 PyTorch loop of the same network and batch.

    .venv/bin/python benchmarks/bench_training.py --data ../shared/data/dsb2018   # about 10 minutes on 2 cores

Both run in this process (the bare loop before and after), on the nuclei network (UNet 3 -> 3
classes, depth 4, width 16) with batches of 8 tiles of 256 x 256, on CUDA if there is one:

- bare: the network in float32, AdamW, the package's loss (cross-entropy + Dice with a border
  weight map) on tensors already in memory; no data loading, no framework.
- unetseg-train: `unetseg.cli.train.main` with the nuclei config (real DSB2018 images, random
  tiles, augmentation, targets and weight maps, the default DataLoader workers, Lightning,
  automatic precision, channels-last), validation off.

Steps are timed after warm-up steps; a callback splits each unetseg-train step into data wait
(the loop waiting for the next batch), forward (the network and the loss), backward, optimiser
and framework overhead (everything else in the step: hooks, logging, precision plugin).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from peak import machine_line, matmul_peak  # benchmarks/ is the script's folder

from unetseg.cli import train
from unetseg.models import UNet
from unetseg.training.losses import SegmentationLoss

NET = dict(in_channels=3, classes=3, depth=4, width=16)
TILE = 256
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def now() -> float:
    """perf_counter after the GPU has finished its queued work (on the CPU, just perf_counter)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


PARTS = ("data wait", "forward", "backward", "optimiser", "framework")


class StepTimer(pl.Callback):
    """Times every training step and its parts; keeps them on the class, as LightningCLI builds the instance."""

    steps: list[dict[str, float]] = []

    def __init__(self):
        self.marks: dict[str, float] = {}
        self.handles = []

    def on_train_start(self, trainer, module) -> None:
        net = module.net
        self.handles = [
            net.register_forward_pre_hook(lambda *args: self.mark("forward start")),
            net.register_forward_hook(lambda *args: self.mark("net done")),
        ]
        self.mark("batch end")

    def mark(self, name: str) -> None:
        self.marks[name] = now()

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self.mark("batch start")

    def on_before_backward(self, trainer, module, loss) -> None:
        self.mark("backward start")

    def on_after_backward(self, trainer, module) -> None:
        self.mark("backward end")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.mark("optimiser start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        end = now()
        m = self.marks
        step = {
            "data wait": m["batch start"] - m["batch end"],
            "forward": m["backward start"] - m["forward start"],
            "backward": m["backward end"] - m["backward start"],
            "optimiser": end - m["optimiser start"],  # Lightning runs forward and backward inside optimizer.step
        }
        step["total"] = end - m["batch end"]
        step["framework"] = step["total"] - sum(step[part] for part in PARTS[:4])
        StepTimer.steps.append(step)
        self.mark("batch end")

    def on_train_end(self, trainer, module) -> None:
        for handle in self.handles:
            handle.remove()


def bare_loop(steps: int, warmup: int, batch_size: int) -> list[dict[str, float]]:
    """The same network, batch and loss in float32 on in-memory tensors: forward, backward, AdamW."""
    torch.manual_seed(0)
    net = UNet(**NET).train().to(DEVICE)
    loss_fn = SegmentationLoss(NET["classes"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.rand(batch_size, NET["in_channels"], TILE, TILE, device=DEVICE)
    targets = torch.randint(0, NET["classes"], (batch_size, TILE, TILE), device=DEVICE)
    weights = 1 + torch.rand(batch_size, TILE, TILE, device=DEVICE)
    records = []
    for index in range(warmup + steps):
        start = now()
        loss = loss_fn(net(images), targets, weights)
        forward = now()
        loss.backward()
        backward = now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = now()
        if index >= warmup:
            records.append(
                {
                    "data wait": 0.0,
                    "forward": forward - start,
                    "backward": backward - forward,
                    "optimiser": end - backward,
                    "framework": 0.0,
                    "total": end - start,
                }
            )
    return records


def unetseg_train(
    data: Path | None, steps: int, warmup: int, config: str, run_dir: Path, batch_size: int
) -> list[dict[str, float]]:
    """unetseg-train for warmup + steps steps (data None: the embedded synthetic nuclei); the timed steps' records."""
    StepTimer.steps = []
    status = train.main(
        [
            "--config",
            config,
            "--data.root",
            str(data) if data is not None else "null",
            "--data.tile_size",
            str(TILE),
            "--data.batch_size",
            str(batch_size),
            "--data.tiles_per_epoch",
            str(batch_size * (warmup + steps)),
            "--trainer.max_steps",
            str(warmup + steps),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.logger",
            "false",
            "--trainer.callbacks+=__main__.StepTimer",
            "--model.pretrained",
            "null",
            "-q",
        ]
    )
    if status != 0 or len(StepTimer.steps) < warmup + steps:
        raise SystemExit(f"unetseg-train failed (status {status}, {len(StepTimer.steps)} steps)")
    return StepTimer.steps[warmup:]


def data_alone(data: Path | None, config: str, batch_size: int, batches: int, warmup: int) -> float:
    """Seconds per batch of the training data pipeline with the model step removed: the config's data module
    (reading, tiles, augmentation, targets, weight maps, collation) in this process (no workers) on one thread,
    as a worker runs it; median of `batches` after `warmup`, so the figure is the pipeline's own cost, not
    hidden behind a step."""
    import yaml
    from jsonargparse import ArgumentParser

    from unetseg.training.data import SegmentationDataModule

    settings = yaml.safe_load(Path(train.resolve_config(config)).read_text())["data"]
    settings.update(root=str(data) if data is not None else None, tile_size=TILE, batch_size=batch_size)
    settings.update(tiles_per_epoch=batch_size * (warmup + batches), num_workers=0)
    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationDataModule, "data")
    module = parser.instantiate(parser.parse_object({"data": settings})).data
    module.setup("fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, where PyTorch runs one thread
    times, start = [], now()
    for _batch in module.train_dataloader():
        times.append(now() - start)
        start = now()
    torch.set_num_threads(threads)
    return float(np.median(times[warmup:]))


def step_flops(batch_size: int) -> float:
    """FLOPs of the network's forward pass on one training batch (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(**NET)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(batch_size, NET["in_channels"], TILE, TILE))
    return counter.get_total_flops()


def summary(name: str, records: list[dict[str, float]], pixels: int) -> dict[str, float]:
    """Median of each part over the timed steps, printed as one table row."""
    medians = {key: float(np.median([record[key] for record in records])) for key in (*PARTS, "total")}
    parts = "".join(f"{medians[part]:>11.2f}" for part in PARTS)
    megapixels = pixels / 1e6 / medians["total"]  # training pixels per second
    print(f"{name:<16}{1 / medians['total']:>9.3f}{megapixels:>9.3f}{medians['total']:>9.2f}{parts}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"))
    parser.add_argument("--config", default="nuclei", help="the unetseg-train config (network and augmentation)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data if args.data.is_dir() else None
    # The bare loop runs before and after, so a change in the shared machine's load hits both alike.
    bare = bare_loop(args.steps // 2, args.warmup, args.batch_size)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        ours = unetseg_train(data, args.steps, args.warmup, args.config, Path(run_dir), args.batch_size)
        whole = time.perf_counter() - started
    torch.set_num_threads(args.threads)  # Lightning may have changed it
    bare += bare_loop(args.steps - args.steps // 2, args.warmup, args.batch_size)
    pipeline = data_alone(data, args.config, args.batch_size, args.steps, args.warmup)
    where = f"{DEVICE.type} ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else f"{args.threads} threads"
    print(machine_line())
    print(
        f"torch {torch.__version__}, {where}, UNet(3 -> 3, depth 4, width 16), batch {args.batch_size} x "
        f"{TILE}x{TILE}, median of {args.steps} steps after {args.warmup}, load average {os.getloadavg()[0]:.1f}; "
        f"unetseg-train took {whole:.0f} s in all, setup included (reading and preparing "
        f"{data or 'the embedded synthetic nuclei'})"
    )
    print(f"{'run':<16}{'steps/s':>9}{'Mpx/s':>9}{'step s':>9}" + "".join(f"{part:>11}" for part in PARTS))
    pixels = args.batch_size * TILE * TILE
    bare_medians = summary("bare fp32 loop", bare, pixels)
    ours_medians = summary("unetseg-train", ours, pixels)
    print(
        f"unetseg-train is {bare_medians['total'] / ours_medians['total']:.2f}x the bare fp32 loop's speed; "
        f"data wait {ours_medians['data wait'] / ours_medians['total']:.1%} of its step"
    )
    print(
        f"the data pipeline alone (model step removed, in this process): {pipeline:.3f} s per batch of "
        f"{args.batch_size}, {pipeline / ours_medians['total']:.1%} of an unetseg-train step"
    )
    flops = step_flops(args.batch_size)
    peak = matmul_peak(torch.float32) if DEVICE.type == "cpu" else float("nan")
    for name, medians in (("bare fp32 loop", bare_medians), ("unetseg-train", ours_medians)):
        rate = flops / medians["forward"] / 1e9
        print(f"{name}: forward and loss at {rate:.1f} GFLOP/s, {rate / peak * 1e9:.1%} of the fp32 matmul peak")


if __name__ == "__main__":
    main()
