"""`unetseg-train` / `scripts/train.py`: LightningCLI over SegmentationModule and SegmentationDataModule."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from unetseg.logs import quiet_dependencies
from unetseg.training.callbacks import SaveCurves
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule
from unetseg.training.safety import AtomicCheckpointIO, FiniteLoss, HistoryCSVLogger, NonFiniteTrainingError

VERBOSE_FLAGS = ("-v", "--verbose")


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


def default_loggers(root: str, resume: bool = False) -> list:
    """CSV always, TensorBoard too when it is installed, all writing into one run folder.

    A resumed run keeps the metrics.csv rows written before its checkpoint.
    """
    loggers = [(HistoryCSVLogger if resume else CSVLogger)(root, name="", version="")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    return loggers + [TensorBoardLogger(root, name="", version="", default_hp_metric=False)]


class TrainCLI(LightningCLI):
    """LightningCLI whose default loggers write into trainer.default_root_dir (the run folder), and whose
    checkpoints are written atomically there (`AtomicCheckpointIO`)."""

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or "runs/default"
            kwargs["logger"] = default_loggers(root, resume=bool(self._get(self.config, "ckpt_path")))
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]  # checkpoints written atomically in the run folder
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> int:
    """Train from a YAML config: `unetseg-train [fit] --config tiny|configs/unet.yaml [--data.root DIR ...]`.

    `fit` is implied when the first argument is an option; --config takes a file or the name of
    a config shipped in the package (`unetseg/configs/`), so it works from any folder. Data
    errors and a diverged training print one error line and return 1; `-v` shows the traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    argv = resolve_configs([arg for arg in argv if arg not in VERBOSE_FLAGS])
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["fit", *argv]
    quiet_dependencies()
    try:
        TrainCLI(
            SegmentationModule,
            SegmentationDataModule,
            trainer_defaults={"callbacks": [SaveCurves(), FiniteLoss()]},
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except (ValueError, OSError, NonFiniteTrainingError) as error:
        if verbose:
            raise
        print(f"unetseg-train: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
