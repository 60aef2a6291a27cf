"""A newcomer's first hour (issue 25), answered in the output itself: one definition of "the large objects";
a plan that says what a slower machine does, and a run that says how much of its plan it did; trivial
baselines beside the model in the run report and in unetseg-evaluate; what --output labels gives on binary
masks."""

import json
import logging
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_train_args

from unetseg.cli import evaluate as evaluate_cli
from unetseg.cli import train as train_cli
from unetseg.planning.plan import Plan, choose_depth, choose_targets, choose_tile, plan_report
from unetseg.planning.survey import DataSummary
from unetseg.planning.timing import Candidate
from unetseg.training.report import RunReport

README = Path(__file__).resolve().parents[1] / "README.md"


def membranes(mask_kind="binary", touching=0.0) -> DataSummary:
    """The survey of ISBI 2012 as the issue met it: 30 images of 512^2, objects of very different extents."""
    extents = np.concatenate([np.full(90, 40), np.linspace(60, 171, 9), [270, 400]])  # 95th 171-ish, 99th ~270
    return DataSummary(
        root=Path("isbi"),
        pairs=30,
        shapes=[(512, 512)] * 30,
        channels=Counter({1: 30}),
        colour=False,
        dtypes=Counter({np.dtype(np.uint8): 30}),
        ranges=[(10.0, 240.0)] * 30,
        mask_kind=mask_kind,
        classes=2,
        extents=extents,
        diameters=extents * 0.8,
        touching=touching,
        read_seconds=2.0,
    )


def isbi_plan(summary: DataSummary) -> Plan:
    """The plan of the issue: 126 steps of 1.77 s for a budget of 4 min."""
    tile, tile_reason = choose_tile(summary)
    depth, depth_reason = choose_depth(summary, tile)
    targets, targets_reason = choose_targets(summary)
    reasons = {
        "in_channels": "grey images",
        "targets": targets_reason,
        "tile_size": tile_reason,
        "depth": depth_reason,
        "width and batch": "the budget is short",
        "epochs": "a validation every ~2 min",
        "precision": "float32",
    }
    return Plan(
        summary=summary, in_channels=1, targets=targets, classes=None, tile_size=tile, val_batches=None, depth=depth,
        width=8, batch_size=4, epochs=3, tiles_per_epoch=168, precision="32-true", num_workers=0,
        seconds_per_step=1.77, validation_seconds=3.0, estimate_seconds=17 + 126 * 1.77 + 9, budget_seconds=240,
        reasons=reasons, candidates=[Candidate(8, 4, 1.6, 0.17)],
    )  # fmt: skip


def test_1_one_definition_of_the_large_objects_in_the_plan_and_the_readme():
    summary = membranes()
    lines = plan_report(isbi_plan(summary))
    text = "\n".join(lines)
    large = f"{np.percentile(summary.extents, 95):.0f} px"
    mentions = re.findall(r"(large\w*) objects[^\d]*(\d+) px", text)
    assert mentions and {word for word, _ in mentions} == {"large"}, mentions  # never "largest"
    assert {f"{number} px" for _, number in mentions} == {large}, mentions  # one number
    assert "large objects (95th percentile of extents)" in text
    readme = README.read_text()
    plan_paragraph = readme[readme.index("**`unetseg-plan`** reads every pair once") :][:1500]
    assert "the large objects, the 95th percentile" in plan_paragraph and "largest objects" not in plan_paragraph


def test_2_the_plan_says_what_a_slower_machine_does():
    plan = isbi_plan(membranes())
    line = next(line for line in plan_report(plan) if line.startswith("on a slower machine:"))
    assert "1.77 s timed here" in line and "trainer.max_time (5 min, the budget + 25%)" in line
    assert "of the 126 steps it did" in line
    shares = [int(share) for share in re.findall(r"~(\d+)% \(", line)]
    assert len(shares) == 2 and 100 >= shares[0] > shares[1] > 0  # 2x, then 4x slower: less of the plan


def fake_trainer(global_step: int, planned: int, timed_out: bool, best: float | None) -> SimpleNamespace:
    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration="00:00:00:01")
    timer.time_remaining = lambda: 0.0 if timed_out else 10.0
    checkpoint = SimpleNamespace(monitor="val/dice", mode="max", best_model_score=best, best_model_path="best.ckpt")
    return SimpleNamespace(
        is_global_zero=True,
        global_step=global_step,
        current_epoch=1,
        max_epochs=3,
        estimated_stepping_batches=planned,
        callbacks=[timer],
        checkpoint_callbacks=[checkpoint],
        default_root_dir="run",
        sanity_checking=False,
    )


def test_2_a_run_cut_by_its_time_limit_says_how_much_of_the_plan_it_did(monkeypatch, caplog):
    callback = RunReport()
    callback.step_times = [7.27] * 48
    trainer = fake_trainer(global_step=48, planned=126, timed_out=True, best=None)
    monkeypatch.setattr(RunReport, "best_checkpoint_callback", staticmethod(lambda t: t.checkpoint_callbacks[0]))
    with caplog.at_level(logging.INFO, logger="unetseg.train"):
        callback.on_fit_end(trainer, None)
    first = caplog.records[0].getMessage()
    assert first.startswith("stopped at the time limit (trainer.max_time) after")
    assert "48 of the 126 planned steps (38% of the plan) at 7.27 s per step" in first


def test_3_the_run_report_shows_the_trivial_baselines_and_warns_when_the_model_does_not_beat_them(monkeypatch, caplog):
    callback = RunReport()
    target = torch.zeros(2, 10, 10, dtype=torch.int64)
    target[:, :, :8] = 2  # 78% foreground (class > 0), as the membranes of the issue
    trainer = fake_trainer(global_step=126, planned=126, timed_out=False, best=0.845)
    callback.on_validation_batch_end(trainer, None, None, {"target": target}, 0)
    callback.on_validation_end(trainer, None)
    callback.on_validation_batch_end(trainer, None, None, {"target": torch.zeros(1, 10, 10)}, 0)  # a second epoch
    monkeypatch.setattr(RunReport, "best_checkpoint_callback", staticmethod(lambda t: t.checkpoint_callbacks[0]))
    with caplog.at_level(logging.INFO, logger="unetseg.train"):
        callback.on_fit_end(trainer, None)
    messages = [record.getMessage() for record in caplog.records]
    assert "(100% of the plan)" in messages[0]
    baselines = next(m for m in messages if m.startswith("trivial baselines"))
    assert "(80% foreground): val/dice all foreground 0.8889, all background 0.0000; the model's best 0.8450" in (
        baselines
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the model's best val/dice 0.8450 does not beat predicting every pixel foreground (0.8889): it has learnt "
        "nothing the pixel counts do not give; train longer (a larger budget), or check the masks"
    ]
    caplog.clear()
    trainer.checkpoint_callbacks[0].best_model_score = 0.95
    with caplog.at_level(logging.INFO, logger="unetseg.train"):
        callback.on_fit_end(trainer, None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_3_a_real_run_ends_with_the_baselines(shared_dataset, tmp_path, capsys):
    assert train_cli.main(tiny_train_args(shared_dataset, tmp_path / "run", "--trainer.max_epochs", "1")) == 0
    err = capsys.readouterr().err
    assert re.search(r"finished after .*: (\d+) of the \1 planned steps \(100% of the plan\)", err), err[-3000:]
    assert "trivial baselines on the validation pixels (" in err and "val/dice all foreground 0." in err


def test_3_evaluate_shows_the_trivial_baselines_and_warns_when_predictions_do_not_beat_them(tmp_path, capsys):
    gt = np.zeros((20, 20), np.uint8)
    gt[:, :16] = 1  # 80% foreground
    weak = np.zeros_like(gt)
    weak[:, :6] = 1  # Dice 2*120/(120+320) = 0.545 < all foreground 0.889
    for folder, mask in (("gt", gt), ("weak", weak), ("good", gt)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "a.tif", mask)
    status = evaluate_cli.main([str(tmp_path / "weak"), str(tmp_path / "gt"), "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert status == 0
    assert (
        "trivial baselines, Dice (mean / pooled): the predictions 0.545 / 0.545; all foreground 0.889 / 0.889, "
        "all background 0.000 / 0.000" in captured.out
    )
    assert "warning: the predictions' mean Dice 0.545 does not beat predicting every pixel foreground (0.889)" in (
        captured.err
    )
    baselines = json.loads((tmp_path / "r.json").read_text())["summary"]["baselines"]
    assert baselines["all_foreground"]["dice"] == pytest.approx(0.8888889)
    assert evaluate_cli.main([str(tmp_path / "good"), str(tmp_path / "gt")]) == 0
    assert "does not beat" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, touching, expected",
    [
        ("binary", 0.0, "labels will be the connected components of the predicted mask"),
        ("instances", 0.3, "objects are grown from their interiors, touching ones kept apart"),
        ("instances", 0.0, "instances that rarely touch"),
    ],
)
def test_4_the_plan_says_what_output_labels_gives_for_these_masks(kind, touching, expected):
    plan = isbi_plan(membranes(kind, touching))
    line = next(line for line in plan_report(plan) if line.startswith("--output labels:"))
    assert expected in line
    if kind == "binary":
        assert plan.targets == "foreground" and "membranes, are over-split: use --output mask" in line
    if touching:
        assert plan.targets == "boundary"  # instance labels with touching objects: instance targets
