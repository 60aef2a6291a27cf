"""Real data, real training: a short fit on DSB2018 must lift validation Dice well above its starting value.

Run with `pytest -m slow`; skipped when ../shared/data/dsb2018 (images/, masks/) is absent.
"""

from pathlib import Path

import lightning.pytorch as pl
import pytest

from unetseg.models import UNet
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule

DSB2018 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
STEPS = 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DSB2018 / "images").is_dir() or not (DSB2018 / "masks").is_dir(),
        reason=f"{DSB2018} (images/, masks/) is not available",
    ),
]


def validation_dice(module, data, root) -> float:
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        limit_val_batches=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return metrics["val/dice"]


def test_short_fit_on_dsb2018_raises_validation_dice(tmp_path):
    pl.seed_everything(0)
    data = SegmentationDataModule(
        root=str(DSB2018),
        in_channels=3,
        targets="foreground",
        tile_size=128,
        val_tile_size=256,
        batch_size=8,
        tiles_per_epoch=STEPS * 8,
        num_workers=0,
        seed=0,
    )
    module = SegmentationModule(UNet(in_channels=3, classes=1, depth=3, width=8), lr=3e-3, scheduler="cosine")

    before = validation_dice(module, data, tmp_path)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=1,
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == STEPS
    after = validation_dice(module, data, tmp_path)

    print(f"DSB2018 validation Dice: {before:.3f} at step 0, {after:.3f} after {STEPS} steps")
    assert after >= before + 0.2
    assert after > 0.6
