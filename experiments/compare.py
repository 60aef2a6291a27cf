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
from pathlib import Path

from experiments.compare_cells import (
    GRADIENT_VARIANTS,
    OTSU,
    VARIANTS,
    gradient_key,
    run_gradients,
    run_otsu,
    run_variant,
    study_data,
)
from experiments.compare_report import grouped, plot_examples, plot_gradient_norms, plot_learning_curves, write_report
from experiments.study import add_study_arguments, run_study

log = logging.getLogger("compare")

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

    def cells(settings: dict) -> list[tuple[str, tuple]]:
        made = [(f"otsu:{OTSU}", (run_otsu, settings, examples))]
        # The short gradient cells last: they fill the processes' ends.
        made += [
            (f"train:{name} seed={seed}", (run_variant, name, seed, settings, examples))
            for seed in range(args.seeds)
            for name in args.variants
        ]
        if not args.no_gradients:
            made += [
                (f"gradients:{gradient_key(*variant)} seed={seed}", (run_gradients, *variant, seed, settings))
                for seed in range(args.seeds)
                for variant in GRADIENT_VARIANTS
            ]
        return made

    def report(data: dict, settings: dict) -> None:
        finish(data, settings, out, examples)

    run_study(args, argv, "experiments.compare", "comparison.json", PROTOCOL_KEYS, cells, call, report)


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
