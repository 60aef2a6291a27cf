"""The skip-connection study: from-scratch U-Net variants (long skips concat / add / nested
(UNet++) / none; plain, residual and dense blocks) against the SMP baseline and Otsu + watershed,
trained on the same data, split, augmentation, loss and step budget, several seeds each; and the
gradient flow of deep variants with and without long and short skips.

A seed sets a network's initial weights and the stream of training tiles (the same stream for
every variant of that seed). Every number of the report comes from the run: accuracy on whole
held-out images (mean ± std over seeds), parameters, FLOPs, CPU time per training step. Cells
run side by side as one-thread processes (`--jobs`), each stored in comparison.json as it
finishes, so a rerun resumes. Writes comparison.{md,json}, learning_curves.png, examples.png and
gradient_norms.png under --out.

    OMP_NUM_THREADS=1 python -m experiments.compare --data ../shared/data/dsb2018 --out reports \
        --seeds 3 --steps 200 --jobs 2
    OMP_NUM_THREADS=1 python -m experiments.compare --quick      # seconds, into runs/compare-quick
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries
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
from unetseg.evaluation.crossval import classical_labels
from unetseg.evaluation.metrics import segmentation_scores, summarize
from unetseg.inference import predict_tiled
from unetseg.inference.postprocess import to_labels
from unetseg.io import Normalization, find_pairs, pair_name, read_image, read_labels, to_channels
from unetseg.models import SMPUnet, UNet
from unetseg.training.augment import Augmentation
from unetseg.training.callbacks import read_metrics
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("compare")

STREAM_SEED = 10_000  # the tile stream of seed s is drawn after seed_everything(STREAM_SEED + s)
OTSU = "otsu + watershed"
BASE = "unet skip=concat"
VARIANTS = {  # name: UNet options (None: the SMP baseline)
    BASE: {},
    "unet skip=add": dict(skip="add"),
    "unet skip=nested": dict(skip="nested"),
    "unet skip=none": dict(skip="none"),
    "unet residual blocks": dict(block="residual"),
    "unet dense blocks": dict(block="dense"),
    "smp resnet34": None,
}
GRADIENT_VARIANTS = [
    (norm, skip, block) for norm in ("batch", "none") for skip in ("concat", "none") for block in ("residual", "plain")
]
PROTOCOL_KEYS = (
    "steps",
    "lr",
    "width",
    "depth",
    "batch_size",
    "tile_size",
    "val_tile_size",
    "val_images",
    "val_checks",
    "val_tiles",
    "gradient_steps",
    "gradient_depth",
    "gradient_width",
    "flops_tile_size",
    "eval_tile_size",
)
QUICK = dict(
    steps=4,
    width=4,
    depth=2,
    batch_size=2,
    tile_size=32,
    val_tile_size=64,
    val_images=2,
    val_checks=1,
    val_tiles=2,
    gradient_steps=2,
    gradient_depth=3,
    gradient_width=4,
    flops_tile_size=64,
    eval_tile_size=64,
    seeds=2,
)


# ---------------------------------------------------------------------------------------------
# Data and networks


_DATA: dict[tuple, tuple] = {}  # per process: the data module and the held-out (name, image, labels)


def study_data(settings: dict) -> tuple[SegmentationDataModule, list]:
    """(data module, held-out pairs), read once per process."""
    key = tuple(sorted((k, str(v)) for k, v in settings.items()))
    if key not in _DATA:
        data = SegmentationDataModule(
            root=settings["data"],
            in_channels=3,
            targets="boundary",
            tile_size=settings["tile_size"],
            val_tile_size=settings["val_tile_size"],
            batch_size=settings["batch_size"],
            tiles_per_epoch=settings["batch_size"] * 100,
            border_weights=True,
            num_workers=0,
            seed=0,
            augmentation=Augmentation(elastic=0.1),
        )
        data.setup("fit")
        names = data.split["val"][: settings["val_images"] or None]
        _DATA[key] = data, load_pairs(Path(settings["data"]), names)
    return _DATA[key]


def load_pairs(root: Path, names: list[str], in_channels: int = 3) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, raw image (C, H, W), labels) for the named stems."""
    paths = {pair_name(image, root / "images"): (image, mask) for image, mask in find_pairs(root)}
    return [(name, to_channels(read_image(paths[name][0]), in_channels), read_labels(paths[name][1])) for name in names]


def build_variant(name: str, seed: int, width: int, depth: int) -> nn.Module:
    """One compared network (3 input channels, 3 classes: background / interior / edge), seeded."""
    torch.manual_seed(seed)
    if VARIANTS[name] is None:
        return SMPUnet(in_channels=3, classes=3, encoder_name="resnet34", encoder_weights=None)
    return UNet(in_channels=3, classes=3, depth=depth, width=width, **VARIANTS[name])


class StepTimer(pl.Callback):
    """CPU time and wall time of the training steps alone (data loading and validation excluded)."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self.steps = self.tiles = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        self.started = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
        self.cpu += time.process_time() - self.started[0]
        self.wall += time.perf_counter() - self.started[1]
        self.steps += 1
        self.tiles += len(batch["image"])


def evaluate(
    net: nn.Module, normalization: Normalization, pairs, tile_size: int, overlap: int = 32
) -> tuple[dict, float, list]:
    """Predict whole held-out images tile by tile, split instances, score; returns summary, Mpx/s, labels."""
    net.eval()
    scores, predictions, pixels, seconds = [], [], 0, 0.0
    for _name, image, labels in pairs:
        started = time.perf_counter()
        probs = predict_tiled(net, normalization(image), tile_size=tile_size, overlap=min(overlap, tile_size // 4))
        seconds += time.perf_counter() - started
        pixels += labels.size
        predicted = to_labels(probs)
        predictions.append(predicted)
        scores.append(segmentation_scores(predicted, labels))
    return summarize(scores), pixels / seconds / 1e6, predictions


def pick_examples(pairs, count: int = 3) -> list[int]:
    """A grey, a colour and the most crowded held-out image, for the example figure."""
    colour = [i for i, (_, image, _) in enumerate(pairs) if not np.array_equal(image[0], image[1])]
    crowded = int(np.argmax([labels.max() for _, _, labels in pairs]))
    grey = [i for i in range(len(pairs)) if i not in colour and i != crowded]
    chosen = [*grey[:1], *colour[:1], crowded]
    return list(dict.fromkeys(chosen))[:count]


# ---------------------------------------------------------------------------------------------
# Cells


def run_otsu(settings: dict, examples: Path) -> dict:
    """The classical reference on the held-out images: Otsu threshold, then distance-transform watershed."""
    started, cpu_started = time.time(), time.process_time()
    _, pairs = study_data(settings)
    predictions = [classical_labels(image) for _, image, _ in pairs]
    summary = summarize([segmentation_scores(p, labels) for p, (_, _, labels) in zip(predictions, pairs)])
    save_examples(examples / "otsu.npz", pairs, predictions)
    return {
        "variant": OTSU,
        **scores_of(summary),
        "seconds": time.time() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def scores_of(summary: dict) -> dict:
    return {"dice": summary["dice"], "dsb_score": summary["dsb_score"], "f1": summary["f1"]}


def save_examples(path: Path, pairs, predictions: list) -> None:
    """The example images' predicted labels, for the figure (not in the JSON: they are images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = pick_examples(pairs)
    np.savez_compressed(path, **{str(index): predictions[index] for index in chosen})


def run_variant(name: str, seed: int, settings: dict, examples: Path) -> dict:
    """Train one variant with one seed, then score it on whole held-out images."""
    started, cpu_started = time.time(), time.process_time()
    data, pairs = study_data(settings)
    net = build_variant(name, seed, settings["width"], settings["depth"])
    result = {
        "variant": name,
        "seed": seed,
        "params": sum(p.numel() for p in net.parameters()),
        "gflops": count_flops(net, 3, settings["flops_tile_size"]) / 1e9,
    }
    module = SegmentationModule(net, lr=settings["lr"], scheduler="cosine", instance_metrics=False)
    timer = StepTimer()
    steps = settings["steps"]
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=-1,
            val_check_interval=max(1, steps // settings["val_checks"]),
            check_val_every_n_epoch=None,
            limit_val_batches=settings["val_tiles"],
            num_sanity_val_steps=0,
            logger=CSVLogger(folder, name="", version=""),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=max(1, steps // 50),
            accelerator="cpu",
            precision="32-true",
        )
        pl.seed_everything(STREAM_SEED + seed, verbose=False)
        trainer.fit(module, datamodule=data)
        series = read_metrics(Path(folder) / "metrics.csv")
    summary, megapixels, predictions = evaluate(net, data.input_spec.normalization, pairs, settings["eval_tile_size"])
    if seed == 0:
        save_examples(examples / f"{name.replace(' ', '_').replace('=', '-')}.npz", pairs, predictions)
    result.update(
        scores_of(summary),
        cpu_ms_per_step=timer.cpu / max(timer.steps, 1) * 1e3,
        train_tiles_per_s=timer.tiles / max(timer.wall, 1e-9),
        infer_mpx_per_s=megapixels,
        train_loss=series.get("train/loss_step", []),
        val_dice=series.get("val/dice", []),
        seconds=time.time() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )
    return result


def run_gradients(norm: str, skip: str, block: str, seed: int, settings: dict) -> dict:
    """Per-level gradient norms (stem, each down level, each up level, head) of one deep variant.

    Recorded at initialisation and after `gradient_steps` training steps on the study's tiles.
    """
    started, cpu_started = time.time(), time.process_time()
    data, _ = study_data(settings)
    torch.manual_seed(seed)
    net = UNet(
        in_channels=3,
        classes=3,
        depth=settings["gradient_depth"],
        width=settings["gradient_width"],
        skip=skip,
        block=block,
        norm=norm,
    )
    module = SegmentationModule(net, lr=1e-3 if norm == "batch" else 3e-4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr)
    levels = [("stem", net.stem)] + [(f"down{i + 1}", m) for i, m in enumerate(net.down)]
    levels += [(f"up{len(net.up) - i}", m) for i, m in enumerate(net.up)] + [("head", net.head)]
    torch.manual_seed(STREAM_SEED + seed)
    history, batches = [], iter(())
    for step in range(settings["gradient_steps"] + 1):
        batch = next(batches, None)
        if batch is None:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        optimizer.zero_grad()
        loss = module.loss(net(batch["image"]), batch["target"], batch.get("weight"))
        loss.backward()
        if step in (0, settings["gradient_steps"]):
            norms = [
                float(torch.sqrt(sum((p.grad**2).sum() for p in m.parameters() if p.grad is not None)))
                for _, m in levels
            ]
            history.append({"step": step, "loss": loss.item(), "norms": norms})
        optimizer.step()
    return {
        "variant": gradient_key(norm, skip, block),
        "seed": seed,
        "levels": [name for name, _ in levels],
        "history": history,
        "seconds": time.time() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def gradient_key(norm: str, skip: str, block: str) -> str:
    return f"norm={norm} skip={skip} block={block}"


# ---------------------------------------------------------------------------------------------
# Plots and the report


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


# ---------------------------------------------------------------------------------------------
# Command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_study_arguments(parser, "compare", "variant", 200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--val-tile-size", type=int, help="tiles of the validation Dice during training")
    parser.add_argument("--val-images", type=int, help="held-out images scored (0: all)")
    parser.add_argument("--val-checks", type=int, help="validations during training (learning curves)")
    parser.add_argument("--val-tiles", type=int, help="held-out tiles of each validation during training")
    parser.add_argument("--gradient-steps", type=int, help="training steps of the gradient study")
    parser.add_argument("--gradient-depth", type=int)
    parser.add_argument("--gradient-width", type=int)
    parser.add_argument("--flops-tile-size", type=int)
    parser.add_argument("--eval-tile-size", type=int, help="tile of the whole-image prediction")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-gradients", action="store_true", help="skip the gradient study")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plots from the JSON")
    args = parser.parse_args(argv)
    defaults = dict(
        steps=200,
        width=16,
        depth=4,
        batch_size=8,
        tile_size=128,
        val_tile_size=256,
        val_images=0,
        val_checks=4,
        val_tiles=24,
        gradient_steps=100,
        gradient_depth=5,
        gradient_width=8,
        flops_tile_size=256,
        eval_tile_size=256,
        seeds=3,
    )
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = "runs/compare-quick" if args.quick else "reports"
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1:
        parser.error("--seeds, --steps and --jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    examples = out / "runs" / "compare-examples"
    started = time.time()
    if args.report_only:
        settings = stored_protocol(out / "comparison.json")
    else:
        settings = {key: getattr(args, key) for key in PROTOCOL_KEYS}
        settings["data"] = str(data_root(args.data, args.quick))
    store = CellStore(out / "comparison.json", settings)
    try:
        if not args.report_only:
            cells = [(f"otsu:{OTSU}", (run_otsu, settings, examples))]
            # The short gradient cells last: they fill the processes' ends.
            cells += [
                (f"train:{name} seed={seed}", (run_variant, name, seed, settings, examples))
                for seed in range(args.seeds)
                for name in args.variants
            ]
            if not args.no_gradients:
                cells += [
                    (f"gradients:{gradient_key(*variant)} seed={seed}", (run_gradients, *variant, seed, settings))
                    for seed in range(args.seeds)
                    for variant in GRADIENT_VARIANTS
                ]
            ran = run_cells(call, cells, store, args.jobs, args.threads)
            command = command_line("experiments.compare", argv)
            record_session(store, command, time.time() - started, ran, args.jobs, args.threads)
        if not store.cells:
            raise SystemExit(f"{store.path}: no finished cells to report")
        finish(store.data, settings, out, examples)
    finally:
        store.close()


def call(function, *arguments):
    """Run one cell's function (a module-level function, so the pool can send it to a process)."""
    return function(*arguments)


def finish(data: dict, settings: dict, out: Path, examples: Path) -> None:
    """Plots and the report from the stored cells."""
    datamodule, pairs = study_data(settings)
    trained, gradients = grouped(data["cells"], "train"), grouped(data["cells"], "gradients")
    extra = {"train_images": len(datamodule.split["train"]), "val_images": len(pairs)}
    if trained:
        plot_learning_curves(trained, out / "learning_curves.png")
    if gradients:
        plot_gradient_norms(gradients, out / "gradient_norms.png")
    extra["examples"] = plot_examples(pairs, examples, out / "examples.png") is not None
    write_report(out / "comparison.md", data, extra)
    log.info("wrote %s", out / "comparison.md")


if __name__ == "__main__":
    main()
