"""The skip-connection comparison's report (experiments/compare.py): cells grouped, plotted and read."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries

from experiments.compare_cells import BASE, OTSU, VARIANTS, pick_examples
from experiments.study import (
    difference,
    in_errors,
    mean_std,
    pm,
    save_figure,
    sessions_line,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("compare")


def grouped(cells: dict, kind: str) -> dict[str, list[dict]]:
    """Cells of one kind ('train', 'gradients', 'otsu') by variant, seeds in order."""
    groups: dict[str, list[dict]] = {}
    for key in sorted(cells, key=lambda k: cells[k].get("seed", 0)):
        if key.split(":")[0] == kind:
            groups.setdefault(cells[key]["variant"], []).append(cells[key])
    return groups


def column(runs: list[dict], key: str) -> list:
    return [run.get(key) for run in runs]


def plot_learning_curves(trained: dict[str, list[dict]], out: Path) -> Path:
    """Training loss (mean over seeds) and validation Dice (mean ± std) of every variant against the step."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in trained.items():
        length = min(len(run["train_loss"]) for run in runs)
        if length:
            steps = [step for step, _ in runs[0]["train_loss"][:length]]
            mean = np.mean([[value for _, value in run["train_loss"][:length]] for run in runs], axis=0)
            window = min(5, length)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            loss_axis.plot(steps[length - len(smooth) :], smooth, label=name)
        checks = min(len(run["val_dice"]) for run in runs)
        if checks:
            dice = np.array([[value for _, value in run["val_dice"][:checks]] for run in runs])
            steps = [step for step, _ in runs[0]["val_dice"][:checks]]
            spread = dice.std(0, ddof=1) if len(runs) > 1 else None
            dice_axis.errorbar(steps, dice.mean(0), yerr=spread, marker="o", capsize=3, label=name)
    loss_axis.set(xlabel="step", ylabel="training loss (mean over seeds, 5-point mean)", yscale="log")
    loss_axis.set_title("training loss")
    dice_axis.set(xlabel="step", ylabel="foreground Dice", title="validation Dice on tiles (mean ± std over seeds)")
    return save_figure(figure, (loss_axis, dice_axis), out)


def plot_gradient_norms(gradients: dict[str, list[dict]], out: Path) -> Path:
    """Gradient norm per level at initialisation and after training (geometric mean over seeds), per norm."""
    norms = sorted({key.split()[0] for key in gradients})
    figure, axes = plt.subplots(len(norms), 2, figsize=(12, 4.5 * len(norms)), squeeze=False)
    for row, norm in enumerate(norms):
        for column_index, (when, index) in enumerate((("at initialisation", 0), ("after training", -1))):
            axis = axes[row, column_index]
            for key, runs in gradients.items():
                if not key.startswith(norm):
                    continue
                logs = np.log10(np.maximum([run["history"][index]["norms"] for run in runs], 1e-30))
                levels = runs[0]["levels"]
                axis.plot(levels, 10 ** logs.mean(0), marker="o", label=key.split(" ", 1)[1])
                if len(runs) > 1:
                    axis.fill_between(levels, 10 ** logs.min(0), 10 ** logs.max(0), alpha=0.15)
                step = runs[0]["history"][index]["step"]
            axis.set(yscale="log", ylabel="gradient L2 norm", title=f"{norm}: {when} (step {step})")
            axis.tick_params(axis="x", rotation=60)
    return save_figure(figure, axes.ravel(), out)


def plot_examples(pairs, examples: Path, out: Path) -> Path | None:
    """Rows: example images; columns: image, ground truth, each method's labels (seed 0); None without them."""
    files = {OTSU: examples / "otsu.npz"}
    files.update({name: examples / f"{name.replace(' ', '_').replace('=', '-')}.npz" for name in VARIANTS})
    predictions = {name: np.load(path) for name, path in files.items() if path.exists()}
    indices = pick_examples(pairs)
    if not predictions or any(str(i) not in p for p in predictions.values() for i in indices):
        return None
    columns = ["image", "ground truth", *predictions]
    figure, axes = plt.subplots(
        len(indices), len(columns), figsize=(2.6 * len(columns), 2.7 * len(indices)), squeeze=False
    )
    for row, index in enumerate(indices):
        _, image, labels = pairs[index]
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
        rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-6)
        panels = [rgb, label2rgb(labels, bg_label=0)]
        panels += [label2rgb(p[str(index)], bg_label=0) for p in predictions.values()]
        for column_index, (title, panel) in enumerate(zip(columns, panels)):
            axis = axes[row, column_index]
            axis.imshow(panel)
            if column_index >= 1:
                axis.contour(find_boundaries(labels), levels=[0.5], colors="white", linewidths=0.3)
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def write_report(path: Path, store: dict, extra: dict) -> None:
    """comparison.md from the stored cells; every number and every sentence of the reading comes from them."""
    protocol, cells = store["protocol"], store["cells"]
    trained, gradients = grouped(cells, "train"), grouped(cells, "gradients")
    otsu = grouped(cells, "otsu").get(OTSU, [])
    seeds = sorted({cell["seed"] for cell in cells.values() if "seed" in cell})
    lines = [
        "# Skip connections, measured: from-scratch U-Net variants vs the SMP baseline",
        "",
        sessions_line(store["sessions"], store["cells"]),
        "",
        f"Data: `{protocol['data']}`, {extra['train_images']} training and {extra['val_images']} held-out images "
        "(split by seed 0, the same split as the shipped nuclei model). Every network: 3 input channels, 3 classes "
        "(background, interior, edge), the border weight map, the same augmentation, AdamW lr "
        f"{protocol['lr']} with cosine decay, batch {protocol['batch_size']} of {protocol['tile_size']}² tiles, "
        f"**{protocol['steps']} steps**; U-Nets depth {protocol['depth']}, width {protocol['width']}. Seeds "
        f"{', '.join(map(str, seeds))}: a seed sets the initial weights and the stream of training tiles, the "
        "same stream for every variant. Scores are on whole held-out images (tiled prediction, "
        f"{protocol['eval_tile_size']}² tiles, instances from interior seeds and watershed), mean ± sample std "
        f"over seeds, *n* the seeds. GFLOPs: one forward pass over a {protocol['flops_tile_size']}² tile. CPU ms / "
        "step: process time of a training step alone (one thread; holds up on a shared machine); tiles/s and "
        "Mpx/s are wall-clock rates and move with the machine's load.",
        "",
        "| method | n | Dice | DSB score | F1@0.5 | parameters | GFLOPs | CPU ms / step | train tiles/s "
        "| infer Mpx/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in otsu:
        lines.append(
            f"| {OTSU} | — | {run['dice']:.3f} | {run['dsb_score']:.3f} | {run['f1']:.3f} | — | — | — | — | — |"
        )
    for name in [n for n in VARIANTS if n in trained]:
        runs = trained[name]
        lines.append(
            f"| {name} | {len(runs)} | {pm(column(runs, 'dice'))} | {pm(column(runs, 'dsb_score'))} | "
            f"{pm(column(runs, 'f1'))} | {runs[0]['params'] / 1e6:.2f} M | {runs[0]['gflops']:.2f} | "
            f"{pm(column(runs, 'cpu_ms_per_step'), 0)} | {pm(column(runs, 'train_tiles_per_s'), 1)} | "
            f"{pm(column(runs, 'infer_mpx_per_s'), 2)} |"
        )
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if extra.get("examples"):
        lines += ["![examples (seed 0)](examples.png)", ""]
    lines += [
        "## Gradient flow",
        "",
        f"Per-level gradient norms of depth-{protocol['gradient_depth']}, width-{protocol['gradient_width']} "
        f"U-Nets, at initialisation and after {protocol['gradient_steps']} training steps (same data and loss), "
        "with and without long skips (concat / none) and short skips (residual / plain blocks), with and without "
        "batch norm. Levels run from the first layer (stem) to the last (head). The table gives log10 of the "
        "stem's gradient norm over the head's, mean ± std over seeds.",
        "",
        "| variant | n | log10 stem / head at init | after training | loss at init | loss after |",
        "|---|---|---|---|---|---|",
    ]
    for key, runs in gradients.items():
        ratio = [
            [math.log10(max(run["history"][i]["norms"][0], 1e-30) / max(run["history"][i]["norms"][-1], 1e-30))]
            for run in runs
            for i in (0, -1)
        ]
        first = [r[0] for r in ratio[0::2]]
        last = [r[0] for r in ratio[1::2]]
        lines.append(
            f"| {key} | {len(runs)} | {pm(first, 1)} | {pm(last, 1)} | "
            f"{pm([run['history'][0]['loss'] for run in runs])} | {pm([run['history'][-1]['loss'] for run in runs])} |"
        )
    lines += ["", "![gradient norms](gradient_norms.png)", "", "## Reading", "", *reading(trained, otsu), ""]
    path.write_text("\n".join(lines))


def reading(trained: dict[str, list[dict]], otsu: list[dict]) -> list[str]:
    """Each variant against concat (and the best against Otsu), sentence by sentence from the numbers."""
    lines = [
        "Generated from the cells by `reading()` in the script. A difference counts when it exceeds 2 standard "
        "errors of the difference of the means over seeds.",
        "",
    ]
    if BASE not in trained:
        return lines + ["(no concat cells yet)"]
    base = trained[BASE]
    questions = {
        "unet skip=none": "Long skips (concat against none)",
        "unet skip=add": "Addition against concatenation",
        "unet skip=nested": "Nested (UNet++) skips against concat",
        "unet residual blocks": "Residual blocks against plain (both concat)",
        "unet dense blocks": "Dense blocks against plain (both concat)",
        "smp resnet34": "The SMP ResNet-34 U-Net against the from-scratch concat U-Net",
    }
    for name, question in questions.items():
        if name not in trained:
            continue
        runs = trained[name]
        # For the long-skip question the sign is that of concat over none: what the skips are worth.
        sign = -1 if name == "unet skip=none" else 1
        parts = []
        for key, label in (("dice", "Dice"), ("dsb_score", "DSB score")):
            change, errors = difference(column(runs, key), column(base, key))
            change, errors = sign * change, sign * errors
            if math.isnan(errors):
                word = "undecided"
            else:
                word = "better" if errors > 2 else "worse" if errors < -2 else "no different"
            parts.append(f"{label} {word} ({change:+.3f}{in_errors(errors)})")
        cost = (
            f"; {runs[0]['params'] / base[0]['params']:.2f}x the parameters, "
            f"{runs[0]['gflops'] / base[0]['gflops']:.2f}x the FLOPs, "
            f"{mean_std(column(runs, 'cpu_ms_per_step'))[0] / mean_std(column(base, 'cpu_ms_per_step'))[0]:.2f}x "
            "the CPU time per step of concat"
        )
        subject = "concat over none" if name == "unet skip=none" else name
        lines.append(f"- {question}: {subject}: {', '.join(parts)}{cost if sign == 1 else ''}.")
    if otsu:
        best = max(trained, key=lambda name: mean_std(column(trained[name], "dsb_score"))[0])
        mean, std, count = mean_std(column(trained[best], "dsb_score"))
        reference = otsu[0]["dsb_score"]
        errors = (mean - reference) / (std / math.sqrt(count)) if count > 1 and std > 0 else math.nan
        if math.isnan(errors):
            word = "undecided against"
        else:
            word = "above" if errors > 2 else "below" if errors < -2 else "level with"
        lines.append(
            f"- The best network by DSB score, {best} ({pm(column(trained[best], 'dsb_score'))}), is {word} Otsu + "
            f"watershed ({reference:.3f}){in_errors(errors)}."
        )
    return lines
