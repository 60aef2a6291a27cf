"""The degradation experiment: does a U-Net get harder to train as its levels get deeper, and
do short skips (residual, dense blocks) or normalisation prevent it?

Plain, residual and dense U-Nets with 1, 2, 4, 8 blocks per level, with batch norm and without,
are trained for the same steps, several seeds each. A seed sets the initial weights and the
stream of training tiles; every cell of one seed sees the same tiles, so cells of a seed are
paired. Per cell it records the training loss curve (where it levels off, its final value), the
held-out Dice, per-layer gradient norms at initialisation and after training, parameters, FLOPs,
saved-activation memory and CPU time per step. Cells run side by side as one-thread processes
(`--jobs`), each stored in degradation.json as it finishes, so a rerun resumes. Writes
degradation.{md,json} and degradation{,_curves,_gradients}.png under --out.

    OMP_NUM_THREADS=1 python -m experiments.degradation --data ../shared/data/dsb2018 --out reports \
        --seeds 3 --steps 1000 --jobs 2
    OMP_NUM_THREADS=1 python -m experiments.degradation --quick      # seconds, into runs/degradation-quick
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

from experiments.study import (
    CellStore,
    add_study_arguments,
    command_line,
    count_flops,
    data_root,
    difference,
    in_errors,
    mean_std,
    pm,
    record_session,
    run_cells,
    save_figure,
    sessions_line,
    stored_protocol,
)
from unetseg import SegmentationDataModule, UNet
from unetseg.models.blocks import BLOCKS, NORMS
from unetseg.training.augment import Augmentation
from unetseg.training.losses import SegmentationLoss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("degradation")

STREAM_SEED = 10_000  # the tile stream of seed s is drawn after torch.manual_seed(STREAM_SEED + s)
PROBE_SEED = 99_999  # the fixed batch on which every net's gradients are measured
LEVELLED_OFF = 0.10  # a curve has levelled off when its last quarter falls by less than this share of its fall
BLOCK_COLOURS = {"plain": "tab:blue", "residual": "tab:orange", "dense": "tab:green"}

# The settings a result depends on; a store made with other values is refused.
PROTOCOL_KEYS = (
    "steps",
    "batch_size",
    "tile_size",
    "val_tile_size",
    "val_tiles",
    "depth",
    "width",
    "dense_layers",
    "lr",
    "last_fraction",
    "probe_batches",
    "cost_tile_size",
)
QUICK = dict(
    steps=12,
    batch_size=2,
    tile_size=32,
    val_tile_size=32,
    val_tiles=4,
    depth=2,
    width=4,
    probe_batches=1,
    cost_tile_size=32,
    blocks_per_level=[1, 2],
    seeds=2,
)


# ---------------------------------------------------------------------------------------------
# One cell: data, training, measurements


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


# ---------------------------------------------------------------------------------------------
# Aggregation, plots and the report


def group_cells(cells: dict[str, dict]) -> dict[tuple[str, str, int], list[dict]]:
    """Cells by (block, norm, blocks per level), in block, norm, depth order."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    order = {block: index for index, block in enumerate(BLOCK_COLOURS)}
    for cell in sorted(
        cells.values(), key=lambda c: (order.get(c["block"], 9), c["norm"], c["blocks_per_level"], c["seed"])
    ):
        groups.setdefault((cell["block"], cell["norm"], cell["blocks_per_level"]), []).append(cell)
    return groups


def values(runs: list[dict], key: str) -> list[float | None]:
    return [run.get(key) for run in runs]


def plot_depth(groups: dict, out: Path) -> Path:
    """Final training loss and held-out Dice against blocks per level, mean ± std over seeds."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    depths = sorted({key[2] for key in groups})
    for (block, norm), style in _lines(groups):
        for axis, key in zip(axes, ("final_loss", "val_dice")):
            stats = [mean_std(values(groups[(block, norm, d)], key)) for d in depths if (block, norm, d) in groups]
            x = [d for d in depths if (block, norm, d) in groups]
            axis.errorbar(
                x,
                [s[0] for s in stats],
                yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
                linestyle=style,
                color=BLOCK_COLOURS.get(block),
                marker="o",
                capsize=3,
                label=f"{block}, norm={norm}",
            )
    axes[0].set(ylabel="final training loss (BCE + Dice)", title="training loss (mean ± std over seeds)")
    axes[1].set(ylabel="foreground Dice", title="held-out Dice (mean ± std over seeds)")
    for axis in axes:
        axis.set(xscale="log", xlabel="blocks per level")
        axis.minorticks_off()
        axis.set_xticks(depths, labels=[str(d) for d in depths])
    return save_figure(figure, axes, out)


def _lines(groups: dict) -> list[tuple[tuple[str, str], str]]:
    """((block, norm), line style) in plotting order: solid with batch norm, dashed without."""
    pairs = dict.fromkeys((block, norm) for block, norm, _ in groups)
    return [(pair, "-" if pair[1] != "none" else "--") for pair in pairs]


def plot_curves(groups: dict, out: Path) -> Path:
    """Mean training loss curve of every cell: one panel per block and norm, one line per depth."""
    pairs = [pair for pair, _ in _lines(groups)]
    depths = sorted({key[2] for key in groups})
    columns = min(len(pairs), 2)
    rows = math.ceil(len(pairs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(depths)))
    for axis, (block, norm) in zip(axes.ravel(), pairs):
        for depth, colour in zip(depths, colours):
            runs = [run for run in groups.get((block, norm, depth), []) if run.get("curve")]
            if not runs:
                continue
            length = min(len(run["curve"]) for run in runs)
            steps = [step for step, _ in runs[0]["curve"][:length]]
            curves = np.array([[loss for _, loss in run["curve"][:length]] for run in runs])
            axis.plot(steps, curves.mean(0), color=colour, label=f"{depth} per level ({len(runs)} seeds)")
            if len(runs) > 1:
                axis.fill_between(steps, curves.min(0), curves.max(0), color=colour, alpha=0.2)
        axis.set(title=f"{block}, norm={norm}", xlabel="step", ylabel="training loss (chunk mean)")
    for axis in axes.ravel()[len(pairs) :]:
        axis.set_axis_off()
    return save_figure(figure, axes.ravel()[: len(pairs)], out)


def plot_gradients(groups: dict, out: Path) -> Path:
    """Per-layer gradient norms (log scale) along the forward path, at initialisation and after training.

    Rows: block types; columns: (norm, when). One line per depth: geometric mean over seeds, the band
    spans the seeds' range.
    """
    blocks = list(dict.fromkeys(key[0] for key in groups))
    norms = list(dict.fromkeys(key[1] for key in groups))
    depths = sorted({key[2] for key in groups})
    panels = [(norm, when) for norm in norms for when in ("grad_init", "grad_trained")]
    figure, axes = plt.subplots(
        len(blocks), len(panels), figsize=(4.2 * len(panels), 3.4 * len(blocks)), squeeze=False, sharey=True
    )
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(depths)))
    for row, block in enumerate(blocks):
        for column, (norm, when) in enumerate(panels):
            axis = axes[row, column]
            for depth, colour in zip(depths, colours):
                runs = [run for run in groups.get((block, norm, depth), []) if run.get(when)]
                if not runs:
                    continue
                logs = np.log10(np.maximum(np.array([run[when] for run in runs]), 1e-30))  # (seeds, layers)
                position = np.linspace(0, 1, logs.shape[1])
                axis.plot(position, 10 ** logs.mean(0), color=colour, label=f"{depth} per level")
                if len(runs) > 1:
                    axis.fill_between(position, 10 ** logs.min(0), 10 ** logs.max(0), color=colour, alpha=0.2)
            label = "at initialisation" if when == "grad_init" else "after training"
            axis.set(yscale="log", title=f"{block}, norm={norm}: {label}", xlabel="layer (0 input end, 1 output end)")
            if column == 0:
                axis.set_ylabel("weight-gradient L2 norm")
    return save_figure(figure, axes.ravel(), out)


def nested_cost(width: int = 32, depth: int = 4, tile_size: int = 256) -> list[dict]:
    """Parameters and FLOPs of concat vs nested (UNet++) skips, and dense blocks, at the default size."""
    rows = []
    for name, kwargs in [
        ("concat", {}),
        ("nested", dict(skip="nested")),
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


def write_report(path: Path, store: dict, extra: dict) -> None:
    """degradation.md from the stored cells; every number and every sentence of the reading comes from them."""
    protocol, groups = store["protocol"], group_cells(store["cells"])
    seeds = sorted({cell["seed"] for cell in store["cells"].values()})
    lines = [
        "# Degradation: plain, residual and dense U-Nets at increasing depth",
        "",
        sessions_line(store["sessions"], store["cells"]),
        "",
        f"Data: `{protocol['data']}` ({extra['train_images']} training images, {extra['val_images']} held-out), "
        "grey input, foreground target (BCE + soft Dice). Every cell: U-Net depth "
        f"{protocol['depth']}, width {protocol['width']}, {protocol['steps']} steps of batch {protocol['batch_size']} "
        f"random {protocol['tile_size']}² tiles (flips, rotations, intensity augmentation), AdamW lr "
        f"{protocol['lr']} (constant), PyTorch's default initialisation. Seeds {', '.join(map(str, seeds))}: a seed "
        "sets the initial weights and the stream of training tiles, the same stream for every cell of that seed. "
        f"Dense blocks have {protocol['dense_layers']} layers and growth width/2, doubled per level. "
        f"**Final loss**: mean training loss over the last {protocol['last_fraction']:.0%} of steps. **Dice**: "
        f"foreground pixels pooled over {extra['val_tiles']} fixed {protocol['val_tile_size']}² tiles of the "
        f"held-out images (predicting all foreground scores {extra['all_foreground_dice']:.3f}). Cells show mean ± "
        "sample std over seeds, *n* the seeds finished; a run whose loss became non-finite is counted under "
        "*diverged* and left out of the means.",
        "",
        "| block | norm | blocks/level | 3x3 convs on the path | n | diverged | final training loss | held-out Dice | "
        "last quarter's change (share of the fall) | log10 grad bottleneck/top, init | after training |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (block, norm, blocks), runs in groups.items():
        convs = 2 * blocks * (2 * protocol["depth"] + 1)
        diverged = sum(run.get("diverged_at") is not None for run in runs)
        shares = [late_share(run) for run in runs]
        lines.append(
            f"| {block} | {norm} | {blocks} | {convs} | {len(runs)} | {diverged} | {pm(values(runs, 'final_loss'))} "
            f"| {pm(values(runs, 'val_dice'))} | {pm(values(runs, 'last_quarter_change'))} ({pm(shares, 2)}) "
            f"| {pm(values(runs, 'grad_ratio_init'), 1)} | {pm(values(runs, 'grad_ratio_trained'), 1)} |"
        )
    lines += [
        "",
        "![final loss and Dice against depth, mean ± std over seeds](degradation.png)",
        "",
        "![training loss curves, mean over seeds, band: the seeds' range](degradation_curves.png)",
        "",
        "## Gradient flow",
        "",
        "The L2 norm of every convolution's weight gradient, in forward order (encoder, bottleneck, decoder, "
        "head), on one fixed batch of "
        f"{protocol['probe_batches'] * protocol['batch_size']} training tiles, at initialisation and after "
        "training; lines are geometric means over seeds, bands the seeds' range. The table's *log10 grad "
        "bottleneck/top* compares the bottleneck level (the layers farthest from the loss) with the top decoder "
        "level (the nearest): -3 means a thousand times weaker gradients at the bottom.",
        "",
        "![per-layer gradient norms](degradation_gradients.png)",
        "",
        "## Cost",
        "",
        f"Parameters, forward FLOPs and the bytes autograd saves for backward, for one {protocol['cost_tile_size']}² "
        f"tile; CPU ms per training step of {protocol['batch_size']} tiles (process time of the step alone, one "
        "thread, mean over the run: it holds up on a shared machine where wall time does not).",
        "",
        "| block | norm | blocks/level | params | GFLOPs | activations MB | CPU ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for (block, norm, blocks), runs in groups.items():
        lines.append(
            f"| {block} | {norm} | {blocks} | {runs[0]['params'] / 1e3:.0f} k | {runs[0]['gflops']:.3f} | "
            f"{runs[0]['activation_mb']:.1f} | {pm(values(runs, 'cpu_ms_per_step'), 0)} |"
        )
    lines += [
        "",
        "## What nested (UNet++) skips and dense blocks cost at the default size",
        "",
        "Default-size U-Net (depth 4, width 32, one input channel and class), one 256x256 tile, counted with "
        "`torch.utils.flop_counter`:",
        "",
        "| variant | params | GFLOPs / 256² | vs concat (params, FLOPs) |",
        "|---|---|---|---|",
    ]
    base = extra["nested_cost"][0]
    for row in extra["nested_cost"]:
        lines.append(
            f"| {row['variant']} | {row['params'] / 1e6:.2f} M | {row['gflops']:.2f} | "
            f"{row['params'] / base['params']:.2f}x, {row['gflops'] / base['gflops']:.2f}x |"
        )
    lines += ["", "## Reading", "", *reading(groups, protocol), ""]
    path.write_text("\n".join(lines))


def late_share(run: dict) -> float | None:
    """The last quarter's fall as a share of the whole fall (None when the loss did not fall)."""
    start, final, change = run.get("start_loss"), run.get("final_loss"), run.get("last_quarter_change")
    if start is None or final is None or change is None or not start > final:
        return None
    return -change / (start - final)


def trend(groups: dict, block: str, norm: str, key: str, digits: int = 2) -> tuple[str, float, float] | None:
    """(sentence, difference, difference in standard errors) of `key` from the shallowest to the deepest net."""
    depths = sorted(d for b, n, d in groups if (b, n) == (block, norm))
    if len(depths) < 2:
        return None
    shallow, deep = groups[(block, norm, depths[0])], groups[(block, norm, depths[-1])]
    change, errors = difference(values(deep, key), values(shallow, key))
    series = " / ".join(pm(values(groups[(block, norm, d)], key), digits) for d in depths)
    blocks = " / ".join(map(str, depths))
    text = f"{series} at {blocks} blocks per level ({change:+.{digits}f} from {depths[0]} to {depths[-1]}"
    text += f"{in_errors(errors)})"
    return text, change, errors


def verdict(errors: float, rising: str, falling: str) -> str:
    """`rising` when the change is over 2 standard errors up, `falling` when over 2 down, else 'flat'."""
    if math.isnan(errors):
        return "undecided"
    return rising if errors > 2 else falling if errors < -2 else "flat"


def reading(groups: dict, protocol: dict) -> list[str]:
    """The reading, sentence by sentence from the numbers: what holds on this task and what does not."""
    pairs = [pair for pair, _ in _lines(groups)]
    depths = sorted({key[2] for key in groups})
    lines = [
        "Generated from the cells by `reading()` in the script. A change counts when it exceeds 2 standard "
        "errors of the difference of the means over seeds; *flat* means it does not; *undecided*, one seed.",
        "",
        "**Training loss against depth** (the degradation claim: deeper plain nets end with a *higher training* "
        "loss at the same steps, which is optimisation, not overfitting):",
        "",
    ]
    degrades = {}
    for block, norm in pairs:
        found = trend(groups, block, norm, "final_loss", 3)
        if found is None:
            continue
        text, _, errors = found
        degrades[(block, norm)] = verdict(errors, "degrades", "improves")
        diverged = sum(r.get("diverged_at") is not None for d in depths for r in groups.get((block, norm, d), []))
        note = f"; {diverged} run(s) diverged (left out)" if diverged else ""
        lines.append(f"- *{block}, norm={norm}*: **{degrades[(block, norm)]}**: {text}{note}.")
    lines += ["", *questions(groups, degrades, depths), "", "**Held-out Dice against depth:**", ""]
    for block, norm in pairs:
        found = trend(groups, block, norm, "val_dice", 3)
        if found is not None:
            spread = max_std(groups, block, norm, "val_dice")
            note = f" Largest seed std in one cell: {spread:.3f}." if math.isfinite(spread) else ""
            lines.append(f"- *{block}, norm={norm}*: **{verdict(found[2], 'rises', 'falls')}**: {found[0]}.{note}")
    lines += [
        "",
        "**Gradient flow** (log10 of the bottleneck's gradient norm over the top decoder level's; *shrinks* "
        "means the bottom of deeper nets gets relatively weaker gradients):",
        "",
    ]
    for block, norm in pairs:
        for key, when in (("grad_ratio_init", "at initialisation"), ("grad_ratio_trained", "after training")):
            found = trend(groups, block, norm, key, 1)
            if found is not None:
                lines.append(
                    f"- *{block}, norm={norm}, {when}*: **{verdict(found[2], 'grows', 'shrinks')}** with depth: "
                    f"{found[0]}."
                )
    if depths:
        deepest = depths[-1]
        for norm in dict.fromkeys(n for _, n in pairs):
            ratios = {
                block: mean_std(values(groups.get((block, norm, deepest), []), "grad_ratio_init"))[0]
                for block, n in pairs
                if n == norm
            }
            if "plain" in ratios and len(ratios) > 1:
                others = ", ".join(f"{b} 10^{r:.1f}" for b, r in ratios.items() if b != "plain")
                lines.append(
                    f"- At {deepest} blocks per level, norm={norm}, at initialisation: the bottleneck's gradient is "
                    f"10^{ratios['plain']:.1f} of the top level's in plain nets; {others}."
                )
    lines += ["", *levelling(groups, depths, protocol)]
    return lines


def questions(groups: dict, degrades: dict, depths: list[int]) -> list[str]:
    """Plain answers to the study's questions: does batch norm alone prevent the degradation, and do
    residual (and dense) blocks train deep nets better than plain ones."""
    lines = []
    plain_none, plain_batch = degrades.get(("plain", "none")), degrades.get(("plain", "batch"))
    if plain_none is not None and plain_batch is not None:
        if "undecided" in (plain_none, plain_batch):
            answer = "undecided: one seed"
        elif plain_none == "degrades" and plain_batch != "degrades":
            answer = "yes: plain nets degrade without norm and not with batch norm"
        elif plain_none == "degrades":
            answer = "no: plain nets degrade with batch norm as well as without"
        elif plain_batch == "degrades":
            answer = "no: plain nets degrade with batch norm, and not without"
        else:
            answer = "there is nothing to prevent: plain nets do not degrade at these depths, with or without norm"
        lines.append(f"- Does batch norm alone prevent the degradation at these depths? {answer}.")
    deepest = depths[-1] if depths else None
    for norm in dict.fromkeys(n for _, n in degrades):
        for block in ("residual", "dense"):
            if (block, norm) not in degrades or ("plain", norm) not in degrades:
                continue
            change, errors = difference(
                values(groups.get((block, norm, deepest), []), "final_loss"),
                values(groups.get(("plain", norm, deepest), []), "final_loss"),
            )
            than = {"lower": "lower than", "higher": "higher than", "flat": "the same, within the noise, as"}
            compared = than.get(verdict(errors, "higher", "lower"), "undecided against")
            plural = {"degrades": "degrade", "improves": "improve", "flat": "stay flat", "undecided": "are undecided"}
            lines.append(
                f"- {block.capitalize()} vs plain, norm={norm}: {block} nets {plural[degrades[(block, norm)]]}, plain "
                f"nets {plural[degrades[('plain', norm)]]}; at {deepest} blocks per level the {block} net's final "
                f"loss is {compared} the plain net's ({change:+.3f}{in_errors(errors)})."
            )
    return lines


def max_std(groups: dict, block: str, norm: str, key: str) -> float:
    stds = [mean_std(values(runs, key))[1] for (b, n, _), runs in groups.items() if (b, n) == (block, norm)]
    finite = [s for s in stds if math.isfinite(s)]
    return max(finite) if finite else math.nan


def levelling(groups: dict, depths: list[int], protocol: dict) -> list[str]:
    """Where the shallowest nets' training loss levels off, and whether it had by the end."""
    if not depths:
        return []
    shallow = depths[0]
    lines = [
        f"**Where the shallow nets level off** ({shallow} block per level; *fall*: first 2% of steps' mean minus "
        f"the final loss; levelled off: the last quarter's fitted change is under {LEVELLED_OFF:.0%} of the fall):",
        "",
    ]
    worst = 0.0
    for (block, norm, blocks), runs in groups.items():
        if blocks != shallow:
            continue
        shares = [late_share(run) for run in runs]
        mean_share = mean_std(shares)[0]
        worst = max(worst, mean_share) if math.isfinite(mean_share) else worst
        lines.append(
            f"- *{block}, norm={norm}*: 90% of the fall done by step {pm(values(runs, 'steps_to_90'), 0)} of "
            f"{protocol['steps']}; the last quarter changed the loss by {pm(values(runs, 'last_quarter_change'))}, "
            f"{pm(shares, 2)} of the fall."
        )
    lines.append("")
    if worst < LEVELLED_OFF:
        lines.append(
            f"Every shallow net had levelled off by step {protocol['steps']}: the final losses compare trained nets."
        )
    else:
        lines.append(
            f"Not every shallow net had levelled off by step {protocol['steps']} (up to {worst:.0%} of the fall in "
            "the last quarter): the final losses compare nets still training, so a gap between depths may be one "
            "of speed, not of where they end; more steps would tell."
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="degradation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_study_arguments(parser, "degradation", "cell", 1000)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--val-tile-size", type=int)
    parser.add_argument("--val-tiles", type=int, help="held-out tiles scored")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--last-fraction", type=float, default=0.1, help="final loss: mean over this share of steps")
    parser.add_argument("--probe-batches", type=int, help="batches in the fixed gradient probe")
    parser.add_argument("--cost-tile-size", type=int, help="tile of the FLOP and activation counts")
    parser.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS))
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=["none", "batch"])
    parser.add_argument("--blocks-per-level", nargs="+", type=int)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plots from the JSON")
    args = parser.parse_args(argv)
    defaults = dict(
        steps=1000,
        batch_size=4,
        tile_size=64,
        val_tile_size=128,
        val_tiles=64,
        depth=4,
        width=8,
        probe_batches=4,
        cost_tile_size=128,
        blocks_per_level=[1, 2, 4, 8],
        seeds=3,
    )
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = "runs/degradation-quick" if args.quick else "reports"
    if args.seeds < 1 or args.steps < 4 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1, --steps at least 4")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    started = time.time()
    if args.report_only:
        settings = stored_protocol(out / "degradation.json")
    else:
        settings = {key: getattr(args, key) for key in PROTOCOL_KEYS}
        settings["data"] = str(data_root(args.data, args.quick))
    store = CellStore(out / "degradation.json", settings)
    try:
        ran = 0
        if not args.report_only:
            cells = [
                (cell_key(block, norm, blocks, seed), (block, norm, blocks, seed, settings))
                for blocks in sorted(args.blocks_per_level, reverse=True)  # longest first
                for seed in range(args.seeds)
                for block in args.blocks
                for norm in args.norms
            ]
            ran = run_cells(run_cell, cells, store, args.jobs, args.threads)
            command = command_line("experiments.degradation", argv)
            record_session(store, command, time.time() - started, ran, args.jobs, args.threads)
        if not store.cells:
            raise SystemExit(f"{store.path}: no finished cells to report")
        finish(store.data, settings, out)
    finally:
        store.close()


def finish(data: dict, settings: dict, out: Path) -> None:
    """Plots and the report from the stored cells."""
    datamodule, tiles, _, all_foreground = study_data(settings)
    extra = {
        "train_images": len(datamodule.split["train"]),
        "val_images": len(datamodule.split["val"]),
        "val_tiles": len(tiles),
        "all_foreground_dice": all_foreground,
        "nested_cost": nested_cost(),
    }
    groups = group_cells(data["cells"])
    plot_depth(groups, out / "degradation.png")
    plot_curves(groups, out / "degradation_curves.png")
    plot_gradients(groups, out / "degradation_gradients.png")
    write_report(out / "degradation.md", data, extra)
    log.info("wrote %s", out / "degradation.md")


if __name__ == "__main__":
    main()
