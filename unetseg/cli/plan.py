"""unetseg-plan: read a training folder once, time candidate networks here, write a config that fits a budget."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level

PROG = "unetseg-plan"
log = logging.getLogger("unetseg.cli.plan")

DESCRIPTION = """\
Plan a training run from the data and this machine. DATA holds images/ and masks/, paired by
name (as unetseg-train reads them). The folder is read once: image sizes, channels, dtype and
intensity range; mask kind (binary, instance labels or classes), object sizes and how many
objects touch. From these come the tile size (2 x the large objects), the depth (receptive
field >= 2 x the largest objects), the targets (boundary when instances touch) and the
channels. A few training steps of each candidate width and batch are timed on this machine,
and the widest network that sees enough tiles within --budget is kept; the epochs fill the
budget. The config is complete: train it with `unetseg-train --config OUT`.

With --folds K the budget covers a K-fold cross-validation: each of the K fold trainings is
planned for budget / K and validates on its own fold (a K-th of the images); the config
carries data.folds, and the commands to train the folds (`unetseg-cv train`), score them
out of fold (`unetseg-cv score`) and make their ensemble (`unetseg-cv ensemble`) are printed.
"""


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: "8,16,32" -> (8, 16, 32)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def fold_count(text: str) -> int:
    """argparse type: the number of folds, 2 or more."""
    from unetseg.planning.plan import check_folds

    try:
        folds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}") from None
    try:
        return check_folds(folds)
    except ValueError as error:  # "--folds 1: why": argparse names the option already
        raise argparse.ArgumentTypeError(f"got {folds}; {str(error).split(': ', 1)[1]}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-plan."""
    from unetseg.models.unet import BLOCKS, SKIPS
    from unetseg.planning.plan import BATCH_SIZES, WIDTHS

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, metavar="DATA", help="folder with images/ and masks/")
    parser.add_argument("--budget", default="1h", help="training time to fill: 20m, 1h, 1h30m (default 1h)")
    parser.add_argument("--out", type=Path, metavar="FILE.yaml", help="the config to write (default: DATA's name.yaml)")
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="the run folder of the training, or the cross-validation's --work folder (default: runs/DATA)",
    )
    parser.add_argument(
        "--folds",
        type=fold_count,
        metavar="K",
        help="plan a K-fold cross-validation (K >= 2) within the budget: each fold trains for budget / K",
    )
    parser.add_argument(
        "--widths",
        type=positive_ints,
        default=WIDTHS,
        metavar="W,W",
        help=f"candidate widths to time (default {','.join(map(str, WIDTHS))})",
    )
    parser.add_argument(
        "--batch-sizes",
        type=positive_ints,
        default=BATCH_SIZES,
        metavar="B,B",
        help=f"candidate batch sizes to time (default {','.join(map(str, BATCH_SIZES))})",
    )
    parser.add_argument("--block", choices=BLOCKS, help="U-Net block to plan for (default: plain)")
    parser.add_argument("--skip", choices=SKIPS, help="long skip connections to plan for (default: concat)")
    parser.add_argument("--blocks-per-level", type=int, metavar="N", help="blocks stacked per level (default 1)")
    add_verbosity_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-plan; returns 0, or 2 for unusable data or options."""
    args = build_parser().parse_args(argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    from unetseg.planning.plan import make_plan, parse_budget, plan_config, plan_report, survey

    name = args.data.resolve().name
    out = args.out or Path(f"{name}.yaml")
    if out.suffix not in (".yaml", ".yml"):
        print(f"{PROG}: error: --out {out}: expected a .yaml file", file=sys.stderr)
        return 2
    try:
        budget = parse_budget(args.budget)
        log.info("reading %s ...", args.data)
        summary = survey(args.data)
        log.info("timing candidate networks on this machine ...")
        architecture = {"block": args.block, "skip": args.skip, "blocks_per_level": args.blocks_per_level}
        architecture = {key: value for key, value in architecture.items() if value is not None}
        plan = make_plan(
            summary,
            budget,
            widths=args.widths,
            batch_sizes=args.batch_sizes,
            architecture=architecture,
            folds=args.folds,
        )
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    report = plan_report(plan)
    run_dir = args.run_dir or f"runs/{name}"
    config = plan_config(plan, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    folds = f" --folds {args.folds}" if args.folds else ""
    commands = run_commands(out, args.data, run_dir, args.folds)
    header = [f"Written by `{PROG} {args.data} --budget {args.budget}{folds}`.", *report, *commands]
    out.write_text("".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False))
    print("\n".join(report))
    print(f"\nwrote {out}\n" + "\n".join(commands))
    return 0


def run_commands(config: Path, data: Path, run_dir: str, folds: int | None) -> list[str]:
    """The commands that run a plan: one training, or the folds of a cross-validation, their scores and ensemble."""
    if not folds:
        return [f"train with:  unetseg-train --config {config}"]
    return [
        f"train the {folds} folds with:  unetseg-cv train {config} {data} --folds {folds} --work {run_dir}",
        f"score them out of fold with:  unetseg-cv score {run_dir} {data}",
        f"their ensemble:  unetseg-cv ensemble {run_dir} {run_dir}/ensemble.ckpt",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
