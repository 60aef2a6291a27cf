"""Command lines: argument parsing and exit codes only. `python -m unetseg SUBCOMMAND` dispatches to them."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description); each module has main(argv) and a console script unetseg-NAME.
COMMANDS = {
    "plan": ("unetseg.cli.plan", "read a training folder, time networks here, write a config that fits a budget"),
    "train": ("unetseg.cli.train", "train a network from a YAML config (LightningCLI)"),
    "predict": ("unetseg.cli.predict", "segment image files or folders with a trained model"),
    "evaluate": ("unetseg.cli.evaluate", "score predicted masks against ground truth"),
    "cv": ("unetseg.cli.cv", "k-fold cross-validation: train the folds, score out of fold, ensemble them"),
    "tune": ("unetseg.cli.tune", "search a model's instance post-processing on annotated images, store it"),
    "export": ("unetseg.cli.export", "export a checkpoint to ONNX or a bioimage.io model package"),
    "demo": ("unetseg.cli.demo", "train on the embedded dataset, predict, print where everything is"),
}

USAGE = (
    "usage: python -m unetseg {"
    + ",".join(COMMANDS)
    + "} [options]\n\nsubcommands:\n"
    + "\n".join(f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items())
    + "\n\n`python -m unetseg SUBCOMMAND --help` shows the options of one."
)


def main(argv: list[str] | None = None) -> int:
    """Run `python -m unetseg SUBCOMMAND [options]`; returns the subcommand's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unetseg: error: unknown subcommand {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    status = importlib.import_module(COMMANDS[name][0]).main(rest)
    return status if isinstance(status, int) else 0
