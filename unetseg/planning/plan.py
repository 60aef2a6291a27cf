"""A training plan from the data and this machine: read the folder once, time candidate networks, write a config.

As nnU-Net plans its patch size, batch and network from a dataset fingerprint and Cellpose
estimates the object diameter, `unetseg.planning.survey` measures the images (sizes, channels, dtype, intensity
range) and masks (binary / instances / classes, object sizes, touching objects); `choose_*`
turn that into a tile size, a depth whose receptive field covers the largest objects and the
targets; `unetseg.planning.timing` times a few training steps of each width and batch on this machine,
and `make_plan` keeps the widest network that sees enough tiles within the budget. With `folds`
the budget covers every fold of a k-fold cross-validation (`unetseg-cv train`): each fold's
training is planned for budget / K and validates on its own fold, a K-th of the images.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from unetseg.evaluation.crossval import fold_dir
from unetseg.models import UNet
from unetseg.planning.survey import DataSummary, survey
from unetseg.planning.timing import Candidate, time_data, time_forward, time_step, training_device
from unetseg.runtime.precision import native_bf16
from unetseg.spec import output_classes
from unetseg.training.report import duration

__all__ = ["DataSummary", "Plan", "make_plan", "parse_budget", "plan_config", "plan_report", "survey"]

log = logging.getLogger(__name__)

# Training should see at least this many pixels (12000 tiles of 128 x 128: the shipped nuclei model saw 19200).
MIN_PIXELS_SEEN = 12_000 * 128 * 128
WIDTHS, BATCH_SIZES = (8, 16, 32), (4, 8)
VAL_FRACTION = 0.15
STARTUP_SECONDS = 15.0  # Lightning, the first checkpoint and the end summary, besides reading the data
VALIDATION_SHARE = 0.08
MIN_VAL_TILES = (
    32  # fewer make a noisy validation Dice  # of the budget; sets how many validations (epochs) the run has
)


# --- Choices from the data --------------------------------------------------------------------------------


def receptive_field(depth: int) -> int:
    """Receptive field (pixels) of `UNet(depth=depth)` with plain blocks, through the bottleneck."""
    rf, jump = 1, 1
    for level in range(depth + 1):
        if level:
            rf, jump = rf + jump, jump * 2  # 2x2 max-pool
        rf += 2 * 2 * jump  # two 3x3 convolutions
    for _ in range(depth):
        jump //= 2
        rf += jump + 2 * 2 * jump  # 2x2 transposed convolution, two 3x3 convolutions
    return rf


def choose_tile(summary: DataSummary) -> tuple[int, str]:
    """Tile side: twice the large objects (`DataSummary.large_objects`), 64 to 256, at most the usual image."""
    large = summary.large_objects
    smallest_side = int(np.median([min(shape) for shape in summary.shapes]))
    tile = min(256, max(64, 32 * math.ceil(2 * large / 32)))
    if smallest_side < tile:
        tile = max(32, 32 * (smallest_side // 32))
    return tile, f"2 x the large objects ({large:.0f} px), within 64-256 and the median image side ({smallest_side} px)"


def choose_depth(summary: DataSummary, tile: int) -> tuple[int, str]:
    """The shallowest depth whose receptive field is twice the large objects (the tile's measure too);
    bottleneck of at least 4 px."""
    large = summary.large_objects
    deepest = max(2, min(5, int(math.log2(tile // 4))))
    depth = next((d for d in range(2, deepest + 1) if receptive_field(d) >= 2 * large), deepest)
    return depth, (
        f"receptive field {receptive_field(depth)} px >= 2 x the large objects ({large:.0f} px)"
        if receptive_field(depth) >= 2 * large
        else f"the deepest a {tile} px tile allows (receptive field {receptive_field(depth)} px < 2 x the large "
        f"objects, {large:.0f} px)"
    )


def choose_targets(summary: DataSummary) -> tuple[str, str]:
    """boundary when instances touch (so they come apart), classes for class masks, else foreground."""
    if summary.mask_kind == "classes":
        return "classes", f"masks hold {summary.classes} class values"
    if summary.mask_kind == "instances" and summary.touching >= 0.02:
        return "boundary", f"{summary.touching:.0%} of the objects touch another one: an edge class separates them"
    if summary.mask_kind == "binary":
        return "foreground", "binary masks (touching objects cannot be told apart)"
    return "foreground", "instances that rarely touch"


# --- The plan -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The chosen settings, why, and the timing they rest on."""

    summary: DataSummary
    in_channels: int
    targets: str
    classes: int | None
    tile_size: int
    val_batches: int | None  # validation tiles per validation; None: all of them
    depth: int
    width: int
    batch_size: int
    epochs: int
    tiles_per_epoch: int
    precision: str
    num_workers: int
    seconds_per_step: float
    validation_seconds: float
    estimate_seconds: float
    budget_seconds: float
    reasons: dict[str, str]
    candidates: list[Candidate]
    architecture: dict = field(default_factory=dict)  # UNet block/skip options the user asked for, timed as such
    folds: int | None = None  # k-fold cross-validation: budget_seconds is then one fold's share of the budget

    @property
    def steps(self) -> int:
        return self.epochs * (self.tiles_per_epoch // self.batch_size)

    @property
    def trainings(self) -> int:
        """How many trainings the budget covers: one per fold, or the one run."""
        return self.folds or 1


def parse_budget(text: str) -> float:
    """Seconds of "90s", "20m", "1h", "1h30m" or a bare number of minutes; ValueError otherwise."""
    units, total, number = {"h": 3600, "m": 60, "s": 1}, 0.0, ""
    text = text.strip().lower()
    if text.replace(".", "", 1).isdigit():
        return float(text) * 60
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total, number = total + float(number) * units[char], ""
        else:
            raise ValueError(f"--budget {text!r}: expected a duration such as 20m, 1h or 1h30m")
    if number or total <= 0:
        raise ValueError(f"--budget {text!r}: expected a duration such as 20m, 1h or 1h30m")
    return total


def check_folds(folds: int) -> int:
    """`folds` when it is an integer >= 2; ValueError that says so otherwise."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(
            f"--folds {folds!r}: cross-validation needs 2 or more folds (leave --folds out to plan one training run)"
        )
    return folds


def make_plan(
    summary: DataSummary,
    budget_seconds: float,
    widths: tuple[int, ...] = WIDTHS,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    bf16: bool | None = None,
    architecture: dict | None = None,
    folds: int | None = None,
) -> Plan:
    """Choose tile, depth, targets and channels from the data, then width, batch and epochs by timing them here.

    `architecture` holds `UNet` options chosen by the user (e.g. block="dense", skip="nested"): the
    candidates are timed with them and the config carries them. `folds` (K >= 2) plans a k-fold
    cross-validation: `budget_seconds` covers the K fold trainings, so each is planned for
    budget / K (its own start-up and data reading included) and validates on its fold's images.
    """
    if folds is not None:
        check_folds(folds)
    if folds is not None and summary.pairs < folds:
        raise ValueError(f"--folds {folds}: {summary.pairs} image pairs cannot make {folds} folds (one image each)")
    budget_seconds /= folds or 1  # each fold trains for its share; the plan below is one fold's
    architecture = dict(architecture or {})
    device = training_device()
    bf16 = native_bf16(device) if bf16 is None else bf16
    in_channels = 3 if summary.colour else 1
    targets, targets_reason = choose_targets(summary)
    classes = summary.classes if targets == "classes" else None
    out_classes = output_classes(targets, classes)
    tile, tile_reason = choose_tile(summary)
    depth, depth_reason = choose_depth(summary, tile)
    cpus = os.cpu_count() or 1
    num_workers = 0 if cpus <= 4 else min(4, cpus - 1)
    tile_data = time_data(summary, tile, targets)
    overhead = summary.read_seconds + STARTUP_SECONDS
    train_seconds = max(budget_seconds - overhead, 0.1 * budget_seconds)

    def pixels_seen(candidate: Candidate) -> float:
        return train_seconds * (1 - VALIDATION_SHARE) / candidate.seconds * candidate.batch_size * tile * tile

    candidates = []
    for width in sorted(widths):  # cheapest first: once a width cannot see enough tiles, wider ones cannot either
        timed = []
        for batch_size in sorted(batch_sizes):
            net = UNet(in_channels, out_classes, depth=depth, width=width, **architecture)
            step = time_step(net, batch_size, tile, out_classes, bf16, device=device)
            # With workers on spare cores data preparation overlaps the step; on few cores it adds to it.
            data = tile_data * batch_size
            timed.append(
                Candidate(width, batch_size, step, max(0.0, data / num_workers - step) if num_workers else data)
            )
            log.info("timed width %d, batch %d: %.2f s per step", width, batch_size, timed[-1].seconds)
        candidates += timed
        if not any(pixels_seen(c) >= MIN_PIXELS_SEEN for c in timed):
            break
    enough = [c for c in candidates if pixels_seen(c) >= MIN_PIXELS_SEEN]
    if enough:
        chosen = max(enough, key=lambda c: (c.width, c.batch_size))
        size_reason = (
            f"the widest network that sees >= {MIN_PIXELS_SEEN / tile**2:.0f} tiles of {tile}^2 in the budget "
            f"({pixels_seen(chosen) / tile**2:.0f})"
        )
    else:
        chosen = max(candidates, key=pixels_seen)
        size_reason = (
            f"the budget is short: even the fastest candidate sees only {pixels_seen(chosen) / tile**2:.0f} tiles "
            f"(aim: {MIN_PIXELS_SEEN / tile**2:.0f}); give a larger --budget for a better model"
        )
    # Validation: fixed tiles of the held-out images (a fold's own images with folds), as many as
    # ~VALIDATION_SHARE of the budget pays for.
    val_images = summary.pairs / folds if folds else max(1, round(VAL_FRACTION * summary.pairs))
    val_tiles = max(1.0, val_images) * float(
        np.mean([math.ceil(h / tile) * math.ceil(w / tile) for h, w in summary.shapes])
    )
    net = UNet(in_channels, out_classes, depth=depth, width=chosen.width, **architecture)
    tile_validation = time_forward(net, tile, bf16, device) + time_data(
        summary, tile, targets, tiles=4, validation=True
    )
    # A validation every two minutes or more, each on at least MIN_VAL_TILES tiles (fewer validations if need be).
    affordable = VALIDATION_SHARE * train_seconds / (min(val_tiles, MIN_VAL_TILES) * tile_validation)
    epochs = int(np.clip(min(train_seconds // 120, affordable), 3, 20))
    val_batches = int(min(val_tiles, max(MIN_VAL_TILES, VALIDATION_SHARE * train_seconds / (epochs * tile_validation))))
    validation_seconds = val_batches * tile_validation
    steps_per_epoch = max(1, int((train_seconds - epochs * validation_seconds) / (epochs * chosen.seconds)))
    estimate = overhead + epochs * (steps_per_epoch * chosen.seconds + validation_seconds)
    some = f"{val_batches} of the ~{val_tiles:.0f} tiles" if val_batches < val_tiles else f"all {val_batches} tiles"
    held_out = f"the fold's own images (1/{folds} of them)" if folds else "the held-out images"
    reasons = {
        "in_channels": "colour images: RGB" if in_channels == 3 else "grey images (RGB files with equal channels too)",
        "targets": targets_reason,
        "tile_size": tile_reason,
        "depth": depth_reason,
        "width and batch": size_reason,
        "epochs": f"a validation every ~2 min or more, on {some} of {held_out} ({validation_seconds:.0f} s)",
        "precision": f"{device.type.upper()} computes bfloat16 natively"
        if bf16
        else f"float32 (no native bfloat16 on {device})",
    }
    return Plan(
        summary=summary,
        in_channels=in_channels,
        targets=targets,
        classes=classes,
        tile_size=tile,
        val_batches=val_batches if val_batches < val_tiles else None,
        depth=depth,
        width=chosen.width,
        batch_size=chosen.batch_size,
        epochs=epochs,
        tiles_per_epoch=steps_per_epoch * chosen.batch_size,
        precision="bf16-mixed" if bf16 else "32-true",
        num_workers=num_workers,
        seconds_per_step=chosen.seconds,
        validation_seconds=validation_seconds,
        estimate_seconds=estimate,
        budget_seconds=budget_seconds,
        reasons=reasons,
        candidates=candidates,
        architecture=architecture,
        folds=folds,
    )


def time_limit(plan: Plan) -> int:
    """Seconds after which training stops whatever happens (`trainer.max_time`): the budget + 25%."""
    return int(1.25 * plan.budget_seconds)


def plan_config(plan: Plan, run_dir: str) -> dict:
    """The LightningCLI config of a plan (in_channels and classes stated once, under data).

    With folds, `run_dir` is the cross-validation's work folder: the config trains fold 0 into
    run_dir/fold_0, where `unetseg-cv train` puts it too; unetseg-cv gives every fold its own
    `--data.fold` and `--trainer.default_root_dir`.
    """
    steps_per_epoch = plan.tiles_per_epoch // plan.batch_size
    limit = time_limit(plan)  # a backstop: the run stops at budget + 25% whatever happens
    # With folds the validation images are the fold's own (val_fraction would be ignored: not written).
    split = {"folds": plan.folds, "fold": 0} if plan.folds else {"val_fraction": VAL_FRACTION}
    data = {
        "root": str(plan.summary.root.resolve()),
        "in_channels": plan.in_channels,
        "targets": plan.targets,
        **({"classes": plan.classes} if plan.classes else {}),
        "tile_size": plan.tile_size,
        "batch_size": plan.batch_size,
        "tiles_per_epoch": plan.tiles_per_epoch,
        **split,
        "seed": 0,
        "border_weights": plan.targets == "boundary",
        "num_workers": plan.num_workers,
    }
    return {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(fold_dir(run_dir, 0)) if plan.folds else run_dir,
            "max_epochs": plan.epochs,
            "max_time": f"00:{limit // 3600:02d}:{limit % 3600 // 60:02d}:{limit % 60:02d}",
            "accelerator": "auto",
            "precision": plan.precision,
            "log_every_n_steps": max(1, min(50, steps_per_epoch)),
            "num_sanity_val_steps": 0,
            **({"limit_val_batches": plan.val_batches} if plan.val_batches else {}),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/dice", "mode": "max", "filename": "best", "save_top_k": 1},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": max(10, int(300 / plan.seconds_per_step)),  # about every 5 min
                    },
                },
            ],
        },
        "model": {
            "net": {
                "class_path": "unetseg.models.UNet",
                "init_args": {"depth": plan.depth, "width": plan.width, **plan.architecture},
            },
            "lr": 0.003,
            "weight_decay": 0.0001,
            "scheduler": "cosine",
        },
        "data": data,
    }


SLOWDOWNS = (2, 4)  # how much slower than when timed the plan says what the run then does


def slower_machine(plan: Plan) -> str:
    """What the run does when steps take longer than they did when timed: it stops at trainer.max_time."""
    overhead = plan.summary.read_seconds + STARTUP_SECONDS
    training = max(plan.estimate_seconds - overhead, 1e-6)
    limit = time_limit(plan)
    shares = [min(1.0, max(0.0, limit - overhead) / (slowdown * training)) for slowdown in SLOWDOWNS]
    done = ", ".join(
        f"{slowdown}x slower: ~{share:.0%} ({int(share * plan.steps)} steps)"
        for slowdown, share in zip(SLOWDOWNS, shares)
    )
    return (
        f"if steps take longer than the {plan.seconds_per_step:.2f} s timed here (other jobs, a loaded or throttled "
        f"machine), the run stops at trainer.max_time ({duration(limit)}, the budget + 25%) with the best checkpoint "
        f"so far, and says at its end how many of the {plan.steps} steps it did; {done}"
    )


def labels_note(plan: Plan) -> str:
    """What `unetseg-predict --output labels` will give with the chosen targets and these masks."""
    if plan.targets == "classes":
        return "class masks: --output labels is not available (use --output mask, the class of each pixel)"
    if plan.targets == "boundary":
        return "instance labels with an edge class: objects are grown from their interiors, touching ones kept apart"
    if plan.summary.mask_kind == "binary":
        return (
            "binary masks hold no instances, so labels will be the connected components of the predicted mask, "
            "split where they narrow by a distance watershed (touching objects cannot be learnt apart; masks "
            "that are not objects, e.g. membranes, are over-split: use --output mask)"
        )
    return "instances that rarely touch: labels are the connected components of the predicted mask (watershed split)"


def plan_report(plan: Plan) -> list[str]:
    """What the plan found and chose, and why, as lines for the terminal and the config's header."""
    lines = plan.summary.describe()
    per_tile = plan.candidates[0].data_seconds / plan.candidates[0].batch_size
    lines.append(
        "timed on this machine (s per step): "
        + ", ".join(f"width {c.width} batch {c.batch_size}: {c.seconds:.2f}" for c in plan.candidates)
        + f" (of which preparing the tiles: {per_tile:.2f} s per tile"
        + (", overlapped by workers)" if plan.num_workers else ")")
    )
    chosen = {
        "in_channels": plan.in_channels,
        "targets": plan.targets,
        "tile_size": plan.tile_size,
        "depth": plan.depth,
        "width and batch": f"{plan.width}, {plan.batch_size}",
        "epochs": f"{plan.epochs} x {plan.tiles_per_epoch // plan.batch_size} steps",
        "precision": plan.precision,
    }
    lines += [f"{name}: {value}  ({plan.reasons[name]})" for name, value in chosen.items()]
    if plan.folds:
        lines.append(
            f"cross-validation: {plan.folds} folds share the budget of "
            f"{duration(plan.trainings * plan.budget_seconds)}: "
            f"each fold trains for {duration(plan.budget_seconds)} on {plan.folds - 1}/{plan.folds} of the images "
            f"and validates on the other 1/{plan.folds}; the steps below are one fold's"
        )
    per_fold = " per fold" if plan.folds else ""
    lines.append(
        f"estimated training time: {duration(plan.estimate_seconds)}{per_fold} for a budget of "
        f"{duration(plan.budget_seconds)}{per_fold} ({plan.steps} steps of {plan.seconds_per_step:.2f} s, "
        f"{plan.epochs} validations of {plan.validation_seconds:.0f} s)"
        + (f"; all {plan.folds} folds: {duration(plan.trainings * plan.estimate_seconds)}" if plan.folds else "")
    )
    lines.append(f"on a slower machine: {slower_machine(plan)}")
    lines.append(f"--output labels: {labels_note(plan)}")
    return lines
