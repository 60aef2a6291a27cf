"""`unetseg-train` / `scripts/train.py`: LightningCLI over SegmentationModule and SegmentationDataModule."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from unetseg.callbacks import SaveCurves
from unetseg.data import SegmentationDataModule
from unetseg.module import SegmentationModule


def default_loggers(root: str) -> list:
    """CSV always, TensorBoard too when it is installed, all writing into one run folder."""
    loggers = [CSVLogger(root, name="", version="")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    return loggers + [TensorBoardLogger(root, name="", version="", default_hp_metric=False)]


class TrainCLI(LightningCLI):
    """LightningCLI whose default loggers write into trainer.default_root_dir (the run folder)."""

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or "runs/default")
        return super().instantiate_trainer(**kwargs)


def main(args=None) -> None:
    """Train from a YAML config: `unetseg-train fit --config configs/unet.yaml [--data.root DIR ...]`.

    `fit` is implied when the first argument is an option.
    """
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["fit", *argv]
    TrainCLI(SegmentationModule, SegmentationDataModule, trainer_defaults={"callbacks": [SaveCurves()]},
             save_config_kwargs={"overwrite": True}, args=argv)


if __name__ == "__main__":
    main()
