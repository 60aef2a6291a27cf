"""The cells of the skip-connection comparison (experiments/compare.py): its data, networks, training and
measurements."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from experiments.study import count_flops
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
