"""`unetseg-train` / `scripts/train.py`: LightningCLI over SegmentationModule and SegmentationDataModule."""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from unetseg.runtime.logs import setup_logging, verbosity_level
from unetseg.runtime.precision import trainer_precision
from unetseg.spec import output_classes
from unetseg.training.callbacks import FinalCheckpoint, HistoryCSVLogger, MetricsHistory
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule
from unetseg.training.report import RunReport
from unetseg.training.safety import AtomicCheckpointIO, FiniteLoss, NonFiniteTrainingError

PROG = "unetseg-train"
log = logging.getLogger("unetseg.train")

HELP = """\
usage: unetseg-train [fit] --config CONFIG [--data.root DIR] [--OPTION VALUE ...] [--ckpt_path last]
       unetseg-train fit --help        every option, with its type and default

Train a segmentation network from a YAML config. CONFIG is a file (e.g. one written by
`unetseg-plan DATA`) or the name of a packaged config ({configs}).
Any value in it can be overridden on the command line.

data (images/ and masks/ under --data.root, paired by file name):
  --data.root DIR              the training folder (null: the embedded synthetic nuclei)
  --data.in_channels 1|3       channels the network takes: grey or RGB (the network follows)
  --data.targets T             foreground | boundary (touching objects) | classes
  --data.classes N             number of classes for targets=classes (the network follows)
  --data.tile_size PIXELS      side of the training tiles
  --data.batch_size N          tiles per step
  --data.tiles_per_epoch N     tiles per epoch (steps per epoch = tiles_per_epoch / batch_size)
  --data.split_file FILE       reuse a train/validation split (the split.json of a run)
  --data.folds K --data.fold I k-fold cross-validation: fold I of K validates (stratified by image type;
                               every fold of a dataset at once: unetseg-cv)
network (--model.net.class_path unetseg.models.UNet or unetseg.models.SMPUnet):
  --model.net.init_args.depth N        downsamplings (receptive field grows with it)
  --model.net.init_args.width N        channels of the first level
  --model.net.init_args.skip S         concat | add | none
  --model.net.init_args.block B        plain | residual
  --model.pretrained PATH|nuclei       start from a checkpoint's weights (fine-tuning)
training:
  --model.lr LR                AdamW learning rate
  --model.scheduler S          cosine | plateau | none
  --trainer.max_epochs N       epochs
  --trainer.max_time D:H:M:S   stop at this wall-clock time whatever the epoch
  --trainer.default_root_dir DIR   the run folder (checkpoints, metrics.csv, curves.png, config.yaml)
  --trainer.precision P        32-true | bf16-mixed | 16-mixed (unset: bf16-mixed where native)
  --ckpt_path last             resume the run in the run folder
  -v, --verbose / -q, --quiet  more output (dependency messages, tracebacks) / warnings only

`python -m unetseg plan DATA --budget 1h` writes a config that fits your data and time budget.
"""


def packaged_configs() -> dict[str, Path]:
    """The YAML configs shipped inside the package, by name ("tiny" -> .../unetseg/configs/tiny.yaml)."""
    folder = Path(str(resources.files("unetseg") / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """A --config value: an existing file as given, else a packaged config's name ("tiny", "tiny.yaml")."""
    if Path(value).is_file():
        return value
    configs = packaged_configs()
    name = Path(value).stem if Path(value).suffix in (".yaml", ".yml") and Path(value).parent == Path(".") else value
    if name in configs:
        return str(configs[name])
    raise SystemExit(
        f"unetseg-train: error: --config {value}: no such file, and not a packaged config ({', '.join(configs)})"
    )


def resolve_configs(argv: list[str]) -> list[str]:
    """argv with every `--config X` / `--config=X` given as a path (packaged names resolved)."""
    resolved, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg == "--config" and argv:
            resolved += [arg, resolve_config(argv.pop(0))]
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            resolved.append(arg)
    return resolved


def default_loggers(root: str) -> list:
    """CSV always (appended to on resume), TensorBoard too when it is installed, all writing into one run folder."""
    loggers = [HistoryCSVLogger(root, name="", version="")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    return loggers + [TensorBoardLogger(root, name="", version="", default_hp_metric=False)]


def automatic_precision(trainer_config: dict) -> str | None:
    """trainer.precision for a config that leaves it unset: "bf16-mixed" where bfloat16 is native, else "32-true";
    None when the config sets it."""
    if trainer_config.get("precision") is not None:
        return None
    return trainer_precision(str(trainer_config.get("accelerator") or "auto"))


class TrainCLI(LightningCLI):
    """LightningCLI whose default loggers write into trainer.default_root_dir (the run folder), whose
    network takes its channels and classes from the data, whose checkpoints are written atomically in
    the run folder (`AtomicCheckpointIO`), whose progress bar shows only on a terminal, and whose
    precision, unless the config sets it, is bf16-mixed on hardware with native bfloat16."""

    def add_arguments_to_parser(self, parser) -> None:
        # Stated once, under data: the network follows (a value given for the network is overridden).
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="parse")
        parser.link_arguments(
            ("data.targets", "data.classes"), "model.net.init_args.classes", compute_fn=output_classes, apply_on="parse"
        )

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        precision = automatic_precision(trainer_config)
        if precision is not None:
            kwargs["precision"] = precision
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or "runs/default")
        if not sys.stderr.isatty():
            kwargs["enable_progress_bar"] = False  # in a log file a bar is thousands of carriage returns
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]  # checkpoints written atomically in the run folder
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:  # any config, e.g. one from unetseg-plan
            # A resumed or restarted run replaces best.ckpt / last.ckpt, never leaves a stale one beside best-v1.ckpt.
            callback._enable_version_counter = False
        return trainer


def split_verbosity(argv: list[str]) -> tuple[list[str], int, int]:
    """argv without -v/--verbose and -q/--quiet, and their counts."""
    verbose = sum(arg in ("-v", "--verbose") for arg in argv) + sum(2 for arg in argv if arg == "-vv")
    quiet = sum(arg in ("-q", "--quiet") for arg in argv)
    return [arg for arg in argv if arg not in ("-v", "-vv", "--verbose", "-q", "--quiet")], verbose, quiet


def main(args: list[str] | None = None) -> int:
    """Train from a YAML config: `unetseg-train [fit] --config tiny|configs/unet.yaml [--data.root DIR ...]`.

    `fit` is implied when the first argument is an option; --config takes a file or the name of
    a config shipped in the package (`unetseg/configs/`), so it works from any folder. A problem
    with the data or the options, or a diverged training, ends with one line naming it and returns 1
    (`-v` shows the traceback).
    """
    argv, verbose, quiet = split_verbosity(list(sys.argv[1:] if args is None else args))
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP.format(configs=", ".join(packaged_configs())))
        raise SystemExit(0 if argv else 2)
    argv = resolve_configs(argv)
    if argv[0].startswith("-"):
        argv = ["fit", *argv]
    level = verbosity_level(verbose, quiet)
    setup_logging(level)
    try:
        TrainCLI(
            SegmentationModule,
            SegmentationDataModule,
            trainer_defaults={
                "callbacks": [MetricsHistory(), FinalCheckpoint(), RunReport(), FiniteLoss()],
                "enable_model_summary": False,  # the run report names the network and its size
            },
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except (ValueError, OSError, NonFiniteTrainingError) as error:  # data, options, checkpoints, divergence
        if level <= logging.DEBUG:
            raise
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
