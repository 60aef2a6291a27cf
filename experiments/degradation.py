"""The degradation experiment: does a U-Net get harder to train as its levels get deeper, and
do short skips (residual, dense blocks) or normalisation prevent it?

Plain, residual and dense U-Nets with 1, 2, 4, 8 blocks per level, with batch norm and
without, are trained for the same steps on the same DSB2018 foreground tiles (drawn once,
identical for every run). Per run it records the final training loss, validation Dice on
tiles of held-out images, parameters, FLOPs per 128x128 tile, saved-activation memory and
training speed, then writes reports/degradation.{md,json,png}. It also measures what UNet++
nested skips cost against concat.

    OMP_NUM_THREADS=1 python -m experiments.degradation --data ../shared/data/dsb2018 --out reports
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from unetseg import SegmentationDataModule, UNet
from unetseg.training.augment import Augmentation
from unetseg.training.losses import SegmentationLoss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("degradation")


def draw_batches(data: SegmentationDataModule, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` training batches (image, target), drawn once so every run sees the same tiles."""
    torch.manual_seed(0)
    np.random.seed(0)
    batches = []
    while len(batches) < steps:
        for batch in data.train_dataloader():
            batches.append((batch["image"], batch["target"]))
            if len(batches) == steps:
                break
    return batches


def validation_tiles(data: SegmentationDataModule, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed tiles spread evenly over the held-out images' tile grid."""
    indices = np.linspace(0, len(data.val_set) - 1, min(count, len(data.val_set))).round().astype(int)
    tiles = [data.val_set[int(i)] for i in dict.fromkeys(indices)]
    return [(tile["image"][None], tile["target"][None]) for tile in tiles]


def count_flops(net: nn.Module, in_channels: int, tile_size: int = 128) -> int:
    """Floating-point operations of one forward pass over a (1, C, tile, tile) input, in eval mode."""
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, in_channels, tile_size, tile_size))
    net.train()
    return counter.get_total_flops()


def saved_activation_bytes(net: nn.Module, image: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()  # one count per storage: views share it
        return tensor

    net.train()
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


def variant_net(block: str, norm: str, blocks_per_level: int, args) -> UNet:
    """The grey one-class U-Net of one variant, with the same initial weights wherever it is built."""
    torch.manual_seed(0)
    return UNet(
        in_channels=1,
        classes=1,
        depth=args.depth,
        width=args.width,
        block=block,
        norm=norm,
        blocks_per_level=blocks_per_level,
        layers=args.dense_layers,
    )


def run_variant(block: str, norm: str, blocks_per_level: int, batches, val_tiles, args) -> dict:
    """Train one network on `batches` and measure it."""
    net = variant_net(block, norm, blocks_per_level, args)
    loss_fn = SegmentationLoss(classes=1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    row = {
        "block": block,
        "norm": norm,
        "blocks_per_level": blocks_per_level,
        "params": sum(p.numel() for p in net.parameters()),
        "gflops_128": count_flops(net, 1) / 1e9,
        "activation_mb_128": saved_activation_bytes(net, torch.zeros(1, 1, 128, 128)) / 2**20,
    }
    losses = []
    started = time.perf_counter()
    for image, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    finite = [value for value in losses[-args.last :] if np.isfinite(value)]
    row.update(
        final_loss=float(np.mean(finite)) if finite else float("nan"),
        first_loss=losses[0],
        losses=losses,
        steps_per_s=len(batches) / seconds,
        val_dice=dice_score(net, val_tiles),
    )
    return row


def measure_speed(rows: list[dict], batches, args, steps: int = 8) -> None:
    """Add CPU milliseconds per training step (process time, after 2 warm-up steps) to each row.

    Process time counts only this process's work, so unlike wall-clock steps/s it holds up on a
    machine shared with other jobs.
    """
    for row in rows:
        net = variant_net(row["block"], row["norm"], row["blocks_per_level"], args)
        loss_fn = SegmentationLoss(classes=1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
        for index, (image, target) in enumerate(batches[: steps + 2]):
            if index == 2:
                started = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(image), target).backward()
            optimizer.step()
        row["cpu_ms_per_step"] = (time.process_time() - started) / steps * 1e3


def nested_cost(width: int = 32, depth: int = 4, tile_size: int = 256) -> list[dict]:
    """Parameters and FLOPs of concat vs nested (UNet++) skips, and dense blocks, at the default size."""
    rows = []
    for name, kwargs in [
        ("concat", {}),
        ("nested", dict(skip="nested")),
        ("nested + deep supervision (eval)", dict(skip="nested", deep_supervision=True)),
        ("concat, dense blocks", dict(block="dense")),
        ("concat, residual blocks", dict(block="residual")),
    ]:
        net = UNet(depth=depth, width=width, **kwargs)
        rows.append(
            {
                "variant": name,
                "params": sum(p.numel() for p in net.parameters()),
                "gflops": count_flops(net, 1, tile_size) / 1e9,
            }
        )
    return rows


def plot(rows: list[dict], out: Path) -> Path:
    """Final training loss and validation Dice against blocks per level; solid batch norm, dashed none."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"plain": "tab:blue", "residual": "tab:orange", "dense": "tab:green"}
    for block, colour in colours.items():
        for norm, style in (("batch", "-"), ("none", "--")):
            runs = sorted(
                (r for r in rows if r["block"] == block and r["norm"] == norm), key=lambda r: r["blocks_per_level"]
            )
            if not runs:
                continue
            x = [r["blocks_per_level"] for r in runs]
            label = f"{block}, norm={norm}"
            loss_axis.plot(x, [r["final_loss"] for r in runs], style, color=colour, marker="o", label=label)
            dice_axis.plot(x, [r["val_dice"] for r in runs], style, color=colour, marker="o", label=label)
    loss_axis.set(ylabel="final training loss (BCE + Dice)", title="training loss")
    dice_axis.set(ylabel="foreground Dice", title="validation Dice (held-out images)")
    for axis in (loss_axis, dice_axis):
        axis.set(xscale="log", xlabel="blocks per level")
        axis.minorticks_off()
        axis.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def write_report(path: Path, result: dict) -> None:
    """reports/degradation.md from the JSON result; every number comes from the run."""
    args, rows = result["args"], result["rows"]
    lines = [
        "# Degradation: plain, residual and dense U-Nets at increasing depth",
        "",
        f"Generated by `{result['command']}` in {result['seconds'] / 60:.1f} minutes on {result['machine']}."
        + (f" {result['note']}" if result.get("note") else ""),
        "",
        f"Data: DSB2018 nuclei ({result['train_images']} training images, {result['val_images']} held-out), "
        f"grey input, foreground target (BCE + soft Dice). Every run: depth {args['depth']}, width {args['width']}, "
        f"the same {args['steps']} batches of {args['batch_size']} random {args['tile_size']}x{args['tile_size']} "
        f"tiles (flips, rotations, intensity augmentation; drawn once), AdamW lr {args['lr']}, PyTorch's default "
        f"initialisation, seed 0. Dense blocks have {args['dense_layers']} layers (two 3x3 convolutions per block, as "
        "plain and residual blocks) and growth width/2, doubled per level. Final loss: mean of the last "
        f"{args['last']} steps. Dice: foreground pixels pooled over {result['val_tiles']} fixed "
        f"{args['val_tile_size']}x{args['val_tile_size']} tiles of the held-out images. Activations: bytes autograd "
        "saves for backward in one training forward of a 128x128 tile. CPU ms / step: process time of one "
        f"training step of {args['batch_size']} tiles (mean of 8, after 2 warm-up steps, one thread); steps/s (wall) "
        "is that of the training run itself, on a machine shared with other jobs, so read it as noisy.",
        "",
        "| block | norm | blocks/level | 3x3 convs on the path | final loss | val Dice | params | "
        "GFLOPs / 128² | activations MB / 128² | CPU ms / step | steps/s (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        convs = 2 * r["blocks_per_level"] * (2 * args["depth"] + 1)
        cpu = f"{r['cpu_ms_per_step']:.0f}" if "cpu_ms_per_step" in r else "—"
        lines.append(
            f"| {r['block']} | {r['norm']} | {r['blocks_per_level']} | {convs} | {r['final_loss']:.3f} | "
            f"{r['val_dice']:.3f} | {r['params'] / 1e3:.0f} k | {r['gflops_128']:.3f} | "
            f"{r['activation_mb_128']:.1f} | {cpu} | {r['steps_per_s']:.2f} |"
        )
    lines += [
        "",
        "![loss and Dice against depth](degradation.png)",
        "",
        "## What nested (UNet++) skips and dense blocks cost",
        "",
        "Default-size U-Net (depth 4, width 32, one input channel and class), one 256x256 tile, counted with "
        "`torch.utils.flop_counter`:",
        "",
        "| variant | params | GFLOPs / 256² | vs concat (params, FLOPs) |",
        "|---|---|---|---|",
    ]
    base = result["nested_cost"][0]
    for r in result["nested_cost"]:
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f} M | {r['gflops']:.2f} | "
            f"{r['params'] / base['params']:.2f}x, {r['gflops'] / base['gflops']:.2f}x |"
        )
    lines += ["", "## Reading", "", result.get("reading", "(to be written after the run)"), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="degradation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/dsb2018", help="folder with images/ and masks/")
    parser.add_argument("--out", default="reports", help="report folder")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (same for all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=96)
    parser.add_argument("--val-tile-size", type=int, default=128)
    parser.add_argument("--val-tiles", type=int, default=48, help="held-out tiles scored")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--last", type=int, default=20, help="final loss = mean of this many last steps")
    parser.add_argument("--blocks", nargs="+", default=["plain", "residual", "dense"])
    parser.add_argument("--norms", nargs="+", default=["batch", "none"])
    parser.add_argument("--blocks-per-level", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from degradation.json")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="add CPU ms per step to the rows of an existing degradation.json, then rewrite the report",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        finish(json.loads((out / "degradation.json").read_text()), out)
        return
    torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=1 python -m experiments.degradation " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    data = SegmentationDataModule(
        root=args.data,
        in_channels=1,
        targets="foreground",
        tile_size=args.tile_size,
        val_tile_size=args.val_tile_size,
        batch_size=args.batch_size,
        tiles_per_epoch=args.batch_size * args.steps,
        num_workers=0,
        seed=0,
        augmentation=Augmentation(),
    )
    data.setup("fit")
    batches, val_tiles = draw_batches(data, args.steps), validation_tiles(data, args.val_tiles)
    log.info("data ready in %.0f s: %d batches, %d val tiles", time.time() - started, len(batches), len(val_tiles))
    if args.speed_only:
        result = json.loads((out / "degradation.json").read_text())
        measure_speed(result["rows"], batches, args)
        result["command"] += f" && {command.strip()}"
        finish(result, out)
        return
    result = {
        "command": command.strip(),
        "args": vars(args),
        "rows": [],
        "train_images": len(data.split["train"]),
        "val_images": len(data.split["val"]),
        "val_tiles": len(val_tiles),
        "machine": f"{platform.machine()} with {os.cpu_count()} CPU cores ({args.threads} torch thread(s)), "
        f"torch {torch.__version__}, no GPU",
    }
    for block in args.blocks:
        for norm in args.norms:
            for blocks_per_level in args.blocks_per_level:
                row = run_variant(block, norm, blocks_per_level, batches, val_tiles, args)
                result["rows"].append(row)
                log.info(
                    "%s norm=%s blocks/level=%d: loss %.3f dice %.3f, %.2f steps/s",
                    block,
                    norm,
                    blocks_per_level,
                    row["final_loss"],
                    row["val_dice"],
                    row["steps_per_s"],
                )
                result["seconds"] = time.time() - started
                (out / "degradation.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["nested_cost"] = nested_cost()
    measure_speed(result["rows"], batches, args)
    result["seconds"] = time.time() - started
    finish(result, out)


def finish(result: dict, out: Path) -> None:
    """Write degradation.json, the plot and the report (counting the nested-skip cost if not yet done)."""
    if "nested_cost" not in result:
        result["nested_cost"] = nested_cost()
    (out / "degradation.json").write_text(json.dumps(result, indent=1))
    plot(result["rows"], out / "degradation.png")
    write_report(out / "degradation.md", result)
    log.info("wrote %s (run took %.1f min)", out / "degradation.md", result["seconds"] / 60)


if __name__ == "__main__":
    main()
