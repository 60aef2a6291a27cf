"""The degradation study's report (experiments/degradation.py): cells grouped, plotted and read."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np

from experiments.study import (
    count_flops,
    difference,
    in_errors,
    mean_std,
    pm,
    save_figure,
    sessions_line,
)
from unetseg import UNet

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("degradation")

LEVELLED_OFF = 0.10  # a curve has levelled off when its last quarter falls by less than this share of its fall
BLOCK_COLOURS = {"plain": "tab:blue", "residual": "tab:orange", "dense": "tab:green"}


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
