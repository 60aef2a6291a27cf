"""Prediction time per image: one network, test-time augmentation, a fold ensemble, and both (issue 28).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ensemble.py    # ~11 min on one thread of this CPU

The shipped nuclei model (`unetseg/weights/nuclei.ckpt`) at its default settings (tile 256,
overlap 64, batch 8, gaussian blend, automatic precision, output mask, as `unetseg-predict
--model nuclei` runs it) predicts a fixed selection of real DSB2018 images, stratified by image
type, four ways: one network, one network with TTA (the 8 flips and quarter turns, which the
model stores as its default), a fold ensemble of K = 5 networks (`make_ensemble`, the file
`unetseg-cv ensemble` writes), and the ensemble with TTA. The ensemble is made of K copies of the
shipped network: its prediction time does not depend on the weights. The variants take turns
on every image, so a change of load during the run touches all of them alike; forward hooks on
the networks count the tile forwards each variant runs, so the cost in forward passes per tile
(networks x TTA passes) is counted, not assumed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from peak import machine_line  # benchmarks/ is the script's folder
from torch import nn

from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import Prediction, PredictSettings
from unetseg.io import find_pairs, read_image, to_channels
from unetseg.io.modality import image_features, modality_names
from unetseg.models.checkpoint import make_ensemble
from unetseg.models.ensemble import Ensemble

MEMBERS = 5  # the folds of a five-fold cross-validation
TTA_PASSES = 8  # the 8 flips and quarter turns of every tile
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018"
MODEL = ROOT / "unetseg" / "weights" / "nuclei.ckpt"


@dataclass
class Row:
    """One variant's cost: networks x TTA passes, the tile forwards counted per tile, seconds per image."""

    variant: str
    networks: int
    tta_passes: int
    forwards_per_tile: float  # counted: tile forwards of every network / tiles of one network without TTA
    seconds_per_image: float

    @property
    def passes(self) -> int:
        return self.networks * self.tta_passes


def networks_of(model: nn.Module) -> list[nn.Module]:
    """The networks a model runs: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


@contextmanager
def counting_forwards(models: list[nn.Module]):
    """Yield a one-item list that counts the tiles every network of `models` is run on.

    Forward hooks travel with the copy the engine predicts with (`inference_copy` deep-copies
    the network, hooks and all, and a hook function is copied as itself), so they must be in
    place before the first prediction.
    """
    count = [0]

    def hook(module, inputs, output):
        count[0] += inputs[0].shape[0]

    handles = [net.register_forward_hook(hook) for model in models for net in networks_of(model)]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def time_variants(
    checkpoint: str | Path,
    images: list[np.ndarray],
    work: Path,
    members: int = MEMBERS,
    settings: PredictSettings | None = None,
) -> list[Row]:
    """Seconds per image and forward passes per tile of one network, TTA, an ensemble of `members` copies of
    `checkpoint`'s network (written with `make_ensemble` into `work`), the ensemble with TTA, and an ensemble
    of as many networks as TTA has passes (the ensemble that costs what TTA costs).

    The variants take turns on every image after one warm-up prediction each on the smallest image.
    """
    settings = settings or PredictSettings()
    single, spec = load_predictor(checkpoint, "cpu")
    ensembles = {
        k: load_predictor(make_ensemble([checkpoint] * k, Path(work) / f"ensemble{k}.ckpt"), "cpu")[0]
        for k in sorted({members, TTA_PASSES})
    }
    variants = [
        ("one network", single, 1, False),
        ("one network + TTA", single, 1, True),
        (f"ensemble of {members}", ensembles[members], members, False),
        (f"ensemble of {members} + TTA", ensembles[members], members, True),
    ]
    if members != TTA_PASSES:
        variants.append((f"ensemble of {TTA_PASSES} (TTA's cost)", ensembles[TTA_PASSES], TTA_PASSES, False))
    with counting_forwards([single, *ensembles.values()]) as count:
        predictions = [
            Prediction(model, spec, replace(settings, tiling=replace(settings.tiling, tta=tta)))
            for _, model, _, tta in variants
        ]
        smallest = min(images, key=lambda image: image.shape[0] * image.shape[1])
        for prediction in predictions:
            prediction.image(smallest)
        seconds, forwards = np.zeros(len(variants)), np.zeros(len(variants))
        for image in images:
            for index, prediction in enumerate(predictions):
                before, started = count[0], time.perf_counter()
                prediction.image(image)
                seconds[index] += time.perf_counter() - started
                forwards[index] += count[0] - before
    tiles = forwards[0]  # one network without TTA runs every tile once
    return [
        Row(name, networks, TTA_PASSES if tta else 1, forwards[index] / tiles, seconds[index] / len(images))
        for index, (name, _, networks, tta) in enumerate(variants)
    ]


def format_table(rows: list[Row]) -> str:
    """The markdown table of the variants, with ratios against one network and against TTA."""
    one = next(row for row in rows if row.passes == 1).seconds_per_image
    tta = next(row for row in rows if row.networks == 1 and row.tta_passes > 1).seconds_per_image
    lines = [
        "| variant | networks x TTA passes | forward passes per tile (counted) | s/image | s per pass "
        "| vs one network | vs TTA |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.networks} x {row.tta_passes} = {row.passes} | {row.forwards_per_tile:g} "
            f"| {row.seconds_per_image:.2f} | {row.seconds_per_image / row.passes:.3f} "
            f"| {row.seconds_per_image / one:.2f}x | {row.seconds_per_image / tta:.2f}x |"
        )
    return "\n".join(lines)


def equal_cost(rows: list[Row]) -> list[str]:
    """The variants of equal cost in forward passes per tile (TTA's 8 passes = an ensemble of 8 networks), with
    their measured times; a TTA variant without a measured partner gets the time an ensemble would take."""
    ensembles = [row for row in rows if row.networks > 1 and row.tta_passes == 1]
    per_pass = min(row.seconds_per_image / row.passes for row in ensembles)
    lines = []
    for row in rows:
        if row.tta_passes == 1:
            continue
        partner = next((other for other in ensembles if other.passes == row.passes), None)
        if partner:
            cost = f"{partner.variant}: measured {partner.seconds_per_image:.2f} s/image"
        else:
            cost = (
                f"an ensemble of {row.passes} networks: ~{row.passes * per_pass:.2f} s/image at {per_pass:.3f} s a pass"
            )
        lines.append(
            f"- {row.variant} ({row.networks} x {row.tta_passes} = {row.passes} forward passes per tile, "
            f"{row.seconds_per_image:.2f} s/image) costs as many passes as {cost}"
        )
    return lines


def select_images(root: Path, count: int) -> tuple[list[str], list[np.ndarray], dict[str, int]]:
    """A fixed selection of `count` images, stratified by image type (at least one of each): within each type,
    evenly spaced in name order. Returns (names, images, images per type)."""
    pairs = sorted(find_pairs(root), key=lambda pair: pair[0].name)
    images = [read_image(image) for image, _ in pairs]
    types = modality_names(np.array([image_features(to_channels(image, 3)) for image in images]))
    groups = {name: [i for i, t in enumerate(types) if t == name] for name in sorted(set(types))}
    quota = {name: max(1, round(count * len(members) / len(images))) for name, members in groups.items()}
    largest = max(quota, key=lambda name: len(groups[name]))
    quota[largest] += count - sum(quota.values())
    chosen = sorted(groups[name][int(k)] for name in groups for k in np.linspace(0, len(groups[name]) - 1, quota[name]))
    return [pairs[i][0].name for i in chosen], [images[i] for i in chosen], quota


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="DSB2018 folder (images/, masks/)")
    parser.add_argument("--images", type=int, default=20, help="images to time (20)")
    parser.add_argument("--members", type=int, default=MEMBERS, help="networks of the ensemble (5)")
    parser.add_argument("--model", type=Path, default=MODEL, help="the network (default: the shipped nuclei model)")
    args = parser.parse_args()
    names, images, quota = select_images(args.data, args.images)
    sizes = sorted({f"{image.shape[0]}x{image.shape[1]}" for image in images})
    types = ", ".join(f"{n} {name}" for name, n in quota.items())
    print(f"{len(images)} DSB2018 images ({types}; sizes {', '.join(sizes)})")
    with tempfile.TemporaryDirectory() as work:
        rows = time_variants(args.model, images, Path(work), args.members)
    print()
    print(format_table(rows))
    print()
    print("Equal prediction cost (forward passes per tile):")
    print("\n".join(equal_cost(rows)))
    print()
    print(
        f"The ensemble holds {args.members} copies of {args.model.name}'s network: prediction time does not depend "
        "on the weights. `--model nuclei` predicts with TTA by default (stored in the model)."
    )
    print(machine_line())


if __name__ == "__main__":
    main()
