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
import logging
from pathlib import Path

from experiments.degradation_cells import cell_key, run_cell, study_data
from experiments.degradation_report import (
    group_cells,
    nested_cost,
    plot_curves,
    plot_depth,
    plot_gradients,
    write_report,
)
from experiments.study import add_study_arguments, run_study
from unetseg.models.blocks import BLOCKS, NORMS

log = logging.getLogger("degradation")


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

    def cells(settings: dict) -> list[tuple[str, tuple]]:
        return [
            (cell_key(block, norm, blocks, seed), (block, norm, blocks, seed, settings))
            for blocks in sorted(args.blocks_per_level, reverse=True)  # longest first
            for seed in range(args.seeds)
            for block in args.blocks
            for norm in args.norms
        ]

    def report(data: dict, settings: dict) -> None:
        finish(data, settings, out)

    run_study(args, argv, "experiments.degradation", "degradation.json", PROTOCOL_KEYS, cells, run_cell, report)


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
