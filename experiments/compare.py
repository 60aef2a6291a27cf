"""The skip-connection study: from-scratch U-Net variants against the SMP baseline, trained on
the same data, split, augmentation, loss and step budget, and the gradient flow of deep
variants with and without long and short skips. `scripts/compare.py` runs it and writes
reports/comparison.md with its plots; no number in the report is typed by hand."""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from torch.utils.flop_counter import FlopCounterMode

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


def comparison_variants(width: int = 16, depth: int = 4) -> dict[str, nn.Module]:
    """The networks compared, all with 3 input channels and 3 output classes (background/interior/edge)."""
    common = dict(in_channels=3, classes=3, depth=depth, width=width)
    return {
        "unet skip=concat": UNet(**common, skip="concat"),
        "unet skip=add": UNet(**common, skip="add"),
        "unet skip=none": UNet(**common, skip="none"),
        "unet residual blocks": UNet(**common, skip="concat", block="residual"),
        "smp resnet34": SMPUnet(in_channels=3, classes=3, encoder_name="resnet34", encoder_weights=None),
    }


def count_flops(net: nn.Module, tile_size: int = 256) -> int:
    """Floating-point operations of one forward pass over a (1, C, tile, tile) input."""
    in_channels = next(p for p in net.parameters() if p.ndim == 4).shape[1]
    was_training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, in_channels, tile_size, tile_size))
    net.train(was_training)
    return counter.get_total_flops()


class TrainThroughput(pl.Callback):
    """Training tiles per second, timed over training batches only (validation excluded)."""

    def __init__(self):
        self.seconds, self.tiles, self.started = 0.0, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
        self.seconds += time.perf_counter() - self.started
        self.tiles += len(batch["image"])

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / max(self.seconds, 1e-9)


def load_pairs(root: Path, names: list[str], in_channels: int = 3) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, raw image (C, H, W), labels) for the named stems."""
    paths = {pair_name(image, root / "images"): (image, mask) for image, mask in find_pairs(root)}
    return [(name, to_channels(read_image(paths[name][0]), in_channels), read_labels(paths[name][1])) for name in names]


def evaluate(module: SegmentationModule, pairs, tile_size: int = 256, overlap: int = 32) -> tuple[dict, float, list]:
    """Predict whole validation images tile by tile, split instances, score; returns summary, Mpx/s, labels."""
    spec = module.hparams["input_spec"]
    normalization = Normalization(**spec["normalization"])
    scores, predictions, pixels, seconds = [], [], 0, 0.0
    for _name, image, labels in pairs:
        started = time.perf_counter()
        probs = predict_tiled(module.net, normalization(image), tile_size=tile_size, overlap=overlap)
        seconds += time.perf_counter() - started
        pixels += labels.size
        predicted = to_labels(probs)
        predictions.append(predicted)
        scores.append(segmentation_scores(predicted, labels))
    return summarize(scores), pixels / seconds / 1e6, predictions


def otsu_watershed(pairs) -> tuple[dict, list]:
    """The classical reference: Otsu threshold of the grey image, then distance-transform watershed.

    Brightfield images (dark nuclei on a bright background) are inverted first, judged by
    whether the median is above the middle of the range.
    """
    scores, predictions = [], []
    for _, image, labels in pairs:
        predicted = classical_labels(image)
        predictions.append(predicted)
        scores.append(segmentation_scores(predicted, labels))
    return summarize(scores), predictions


def train_variant(
    name: str, net: nn.Module, data: SegmentationDataModule, steps: int, out: Path, lr: float
) -> tuple[SegmentationModule, TrainThroughput, Path]:
    """Train one variant for `steps` steps with validation at quarters; returns module, throughput, log dir."""
    folder = out / "runs" / name.replace(" ", "_").replace("=", "-")
    module = SegmentationModule(net, lr=lr, scheduler="cosine")
    throughput = TrainThroughput()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        val_check_interval=max(1, steps // 4),
        check_val_every_n_epoch=None,
        limit_val_batches=60,
        num_sanity_val_steps=0,
        logger=CSVLogger(folder, name="", version=""),
        callbacks=[throughput],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        accelerator="cpu",
        deterministic=False,
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=data)
    module.eval()
    return module, throughput, folder


def gradient_norms(
    data: SegmentationDataModule, steps: int, depth: int = 5, width: int = 8, record_every: int = 25
) -> dict:
    """Per-level gradient norms (stem, each down level, each up level, head) of deep variants.

    Recorded at initialisation and every `record_every` training steps, for the four
    combinations of long skips (concat / none) and short skips (residual / plain blocks),
    with and without normalisation layers (BatchNorm hides much of what skips are for).
    """
    results = {}
    for norm in ("batch", "none"):
        for skip in ("concat", "none"):
            for block in ("residual", "plain"):
                pl.seed_everything(0, verbose=False)
                net = UNet(in_channels=3, classes=3, depth=depth, width=width, skip=skip, block=block, norm=norm)
                module = SegmentationModule(net, lr=1e-3 if norm == "batch" else 3e-4)
                optimizer = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr)
                levels = [("stem", net.stem)] + [(f"down{i + 1}", m) for i, m in enumerate(net.down)]
                levels += [(f"up{len(net.up) - i}", m) for i, m in enumerate(net.up)] + [("head", net.head)]
                history, loader = [], iter(data.train_dataloader())
                for step in range(steps + 1):
                    batch = next(loader, None)
                    if batch is None:
                        loader = iter(data.train_dataloader())
                        batch = next(loader)
                    optimizer.zero_grad()
                    loss = module.loss(net(batch["image"]), batch["target"], batch.get("weight"))
                    loss.backward()
                    if step % record_every == 0:
                        norms = [
                            float(torch.sqrt(sum((p.grad**2).sum() for p in m.parameters() if p.grad is not None)))
                            for _, m in levels
                        ]
                        history.append({"step": step, "loss": loss.item(), "norms": norms})
                    optimizer.step()
                results[f"norm={norm} skip={skip} block={block}"] = {
                    "levels": [n for n, _ in levels],
                    "history": history,
                }
    return results


def plot_gradient_norms(results: dict, out: Path) -> Path:
    """Gradient norm per level at initialisation and at the last recorded step, one panel per norm."""
    norms = sorted({key.split()[0] for key in results})
    figure, axes = plt.subplots(len(norms), 2, figsize=(12, 4.5 * len(norms)), squeeze=False)
    for row, norm in enumerate(norms):
        for column, (when, index) in enumerate((("at initialisation", 0), ("after training", -1))):
            axis = axes[row, column]
            for key, value in results.items():
                if not key.startswith(norm):
                    continue
                record = value["history"][index]
                axis.plot(value["levels"], record["norms"], marker="o", label=key.split(" ", 1)[1])
            step = value["history"][index]["step"]
            axis.set(yscale="log", ylabel="gradient L2 norm", title=f"{norm}: {when} (step {step})")
            axis.tick_params(axis="x", rotation=60)
    return save_figure(figure, axes.ravel(), out)


def plot_learning_curves(logs: dict[str, Path], out: Path) -> Path:
    """Training loss and validation Dice of every variant against the step."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, folder in logs.items():
        series = read_metrics(folder / "metrics.csv")
        if "train/loss_step" in series:
            steps, values = zip(*series["train/loss_step"])
            smooth = np.convolve(values, np.ones(5) / 5, mode="valid")
            loss_axis.plot(steps[len(steps) - len(smooth) :], smooth, label=name)
        if "val/dice" in series:
            dice_axis.plot(*zip(*series["val/dice"]), marker="o", label=name)
    loss_axis.set(xlabel="step", ylabel="training loss (5-step mean)", yscale="log", title="training loss")
    dice_axis.set(xlabel="step", ylabel="foreground Dice", title="validation Dice (tiles)")
    return save_figure(figure, (loss_axis, dice_axis), out)


def save_figure(figure, axes, out: Path) -> Path:
    """Grid and legend on each axis, then a tight PNG at `out`."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def plot_examples(pairs, predictions: dict[str, list], indices: list[int], out: Path) -> Path:
    """Rows: example images; columns: image, ground truth, each method's instance labels."""
    columns = ["image", "ground truth", *predictions]
    figure, axes = plt.subplots(
        len(indices), len(columns), figsize=(2.6 * len(columns), 2.7 * len(indices)), squeeze=False
    )
    for row, index in enumerate(indices):
        name, image, labels = pairs[index]
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
        rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-6)
        panels = [rgb, label2rgb(labels, bg_label=0)] + [label2rgb(p[index], bg_label=0) for p in predictions.values()]
        for column, (title, panel) in enumerate(zip(columns, panels)):
            axis = axes[row, column]
            axis.imshow(panel)
            if column >= 1:
                axis.contour(find_boundaries(labels), levels=[0.5], colors="white", linewidths=0.3)
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="compare", description=__doc__)
    parser.add_argument("--data", default="../shared/data/dsb2018", help="folder with images/ and masks/")
    parser.add_argument("--out", default="reports", help="report folder")
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (same for all)")
    parser.add_argument("--gradient-steps", type=int, default=100, help="training steps of the gradient study")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--val-images", type=int, default=0, help="limit validation images (0: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    data = SegmentationDataModule(
        root=args.data,
        in_channels=3,
        targets="boundary",
        tile_size=128,
        val_tile_size=256,
        batch_size=8,
        tiles_per_epoch=8 * 100,
        border_weights=True,
        num_workers=1,
        seed=0,
        augmentation=Augmentation(elastic=0.1),
    )
    data.setup("fit")
    val_names = data.split["val"][: args.val_images or None]
    pairs = load_pairs(Path(args.data), val_names)

    rows, logs, predictions = {}, {}, {}
    otsu_summary, predictions["otsu + watershed"] = otsu_watershed(pairs)
    rows["otsu + watershed"] = {
        "dice": otsu_summary["dice"],
        "dsb_score": otsu_summary["dsb_score"],
        "f1": otsu_summary["f1"],
    }
    for name, net in comparison_variants().items():
        print(f"== {name}", flush=True)
        params, flops = sum(p.numel() for p in net.parameters()), count_flops(net)
        module, throughput, logs[name] = train_variant(name, net, data, args.steps, out, args.lr)
        module.hparams["input_spec"] = data.input_spec
        summary, megapixels, predictions[name] = evaluate(module, pairs)
        rows[name] = {
            "dice": summary["dice"],
            "dsb_score": summary["dsb_score"],
            "f1": summary["f1"],
            "params": params,
            "gflops_256": flops / 1e9,
            "train_tiles_per_s": throughput.tiles_per_second,
            "infer_mpx_per_s": megapixels,
        }
        print(json.dumps(rows[name]), flush=True)

    print("== gradient norms", flush=True)
    gradients = gradient_norms(data, args.gradient_steps)
    elapsed = time.time() - started
    (out / "comparison.json").write_text(
        json.dumps({"rows": rows, "gradients": gradients, "args": vars(args), "seconds": elapsed}, indent=1)
    )
    plot_learning_curves(logs, out / "learning_curves.png")
    plot_gradient_norms(gradients, out / "gradient_norms.png")
    examples = pick_examples(pairs)
    plot_examples(pairs, predictions, examples, out / "examples.png")
    write_report(out / "comparison.md", rows, gradients, args, elapsed, len(pairs), len(data.split["train"]))
    print(f"wrote {out / 'comparison.md'} in {elapsed / 60:.1f} min")


def pick_examples(pairs, count: int = 3) -> list[int]:
    """A grey, a colour and the most crowded validation image, for the example figure."""
    colour = [i for i, (_, image, _) in enumerate(pairs) if not np.array_equal(image[0], image[1])]
    crowded = int(np.argmax([labels.max() for _, _, labels in pairs]))
    grey = [i for i in range(len(pairs)) if i not in colour and i != crowded]
    chosen = [*grey[:1], *colour[:1], crowded]
    return list(dict.fromkeys(chosen))[:count]


def write_report(
    path: Path, rows: dict, gradients: dict, args, seconds: float, val_count: int, train_count: int
) -> None:
    """The markdown report; every number comes from this run."""
    lines = [
        "# Skip connections, measured: from-scratch U-Net variants vs the SMP baseline",
        "",
        f"Generated by `python scripts/compare.py --steps {args.steps} --gradient-steps {args.gradient_steps}` "
        f"in {seconds / 60:.1f} minutes on {platform.machine()} with {os.cpu_count()} CPU cores "
        f"({torch.get_num_threads()} torch thread(s)), torch {torch.__version__}, no GPU.",
        "",
        f"Data: DSB2018 nuclei, {train_count} training and {val_count} validation images (split by seed 0, the "
        "same split as the shipped nuclei model). Every network: 3 input channels, 3 classes (background, "
        "interior, edge), the border weight map, the same augmentation, AdamW with cosine decay, "
        f"batch 8 of 128x128 tiles, **{args.steps} steps** each. Scores are on whole validation images "
        "(tiled prediction, 256 tiles, 32 px overlap, instances from interior seeds and watershed).",
        "",
        "| method | Dice | DSB score | F1@0.5 | parameters | GFLOPs / 256² tile | train tiles/s | infer Mpx/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        extra = (
            "| — | — | — | — |"
            if "params" not in row
            else f"| {row['params'] / 1e6:.2f} M | {row['gflops_256']:.2f} | {row['train_tiles_per_s']:.1f} | "
            f"{row['infer_mpx_per_s']:.2f} |"
        )
        lines.append(f"| {name} | {row['dice']:.3f} | {row['dsb_score']:.3f} | {row['f1']:.3f} {extra}")
    lines += [
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![examples](examples.png)",
        "",
        "## Gradient flow",
        "",
        f"Per-level gradient norms of depth-5, width-8 U-Nets, at initialisation and after "
        f"{args.gradient_steps} training steps (same data and loss). Levels run from the first layer "
        "(stem) to the last (head).",
        "",
        "| variant | stem / head at init | stem / head after training | loss at init | loss after |",
        "|---|---|---|---|---|",
    ]
    for key, value in gradients.items():
        first, last = value["history"][0], value["history"][-1]
        lines.append(
            f"| {key} | {first['norms'][0] / first['norms'][-1]:.3g} | "
            f"{last['norms'][0] / last['norms'][-1]:.3g} | {first['loss']:.3f} | {last['loss']:.3f} |"
        )
    lines += ["", "![gradient norms](gradient_norms.png)", ""]
    path.write_text("\n".join(lines))
