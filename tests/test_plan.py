"""unetseg-plan: the data survey, the choices made from it, and the config it writes."""

import numpy as np
import pytest
import tifffile
import yaml
from conftest import write_pair

from unetseg.cli import plan as plan_cli
from unetseg.cli.train import TrainCLI
from unetseg.planning.plan import (
    choose_depth,
    choose_targets,
    choose_tile,
    make_plan,
    parse_budget,
    plan_config,
    receptive_field,
)
from unetseg.planning.survey import mask_kind, survey
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule


def test_receptive_field_of_the_unet():
    # Two 3x3 convolutions per level, 2x2 pooling and transposed convolutions: 47, 103, 215 px.
    assert [receptive_field(depth) for depth in (2, 3, 4)] == [47, 103, 215]


@pytest.mark.parametrize(
    "text, seconds", [("20m", 1200), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("45", 2700), ("0.5h", 1800)]
)
def test_budgets(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "m20", "0m"])
def test_bad_budgets_are_refused_by_name(text):
    with pytest.raises(ValueError, match="--budget .*expected a duration such as 20m, 1h"):
        parse_budget(text)


def test_survey_of_touching_synthetic_nuclei(make_dataset):
    summary = survey(make_dataset(count=6, shape=(96, 96)))
    assert summary.pairs == 6 and summary.shapes == [(96, 96)] * 6
    assert dict(summary.channels) == {1: 6} and not summary.colour
    assert {str(dtype) for dtype in summary.dtypes} == {"uint8", "uint16"}  # PNGs and 12-bit TIFFs
    assert summary.mask_kind == "instances"
    assert 8 < np.median(summary.diameters) < 40  # nuclei of radius 6 to 16 px
    assert summary.touching > 0.2  # half of the centres are clustered
    assert choose_targets(summary)[0] == "boundary"
    tile, _ = choose_tile(summary)
    assert tile == 64 or tile % 32 == 0 and tile <= 96  # twice the large nuclei, at most the image side
    depth, reason = choose_depth(summary, tile)
    assert receptive_field(depth) >= 2 * summary.large_objects or "deepest" in reason  # one "large objects"
    assert 2**depth <= tile // 4


def test_mask_kinds():
    binary = [np.array([255]), np.array([255]), np.array([])]
    assert mask_kind(binary, [5, 3, 0]) == "binary"
    classes = [np.array([1, 2]), np.array([1, 2, 3])]  # few values, many objects each
    assert mask_kind(classes, [20, 30]) == "classes"
    instances = [np.arange(1, 40), np.arange(1, 12)]  # one value per object
    assert mask_kind(instances, [35, 12]) == "instances"


def test_survey_of_grey_binary_masks_and_rgb_copies(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        mask = np.zeros((64, 80), np.uint8)
        mask[10:30, 10:30] = mask[40:50, 50:70] = 255
        grey = (rng.random((64, 80)) * 200).astype(np.uint8)
        write_pair(tmp_path, f"p{index}", np.stack([grey] * 3, axis=-1), mask)  # RGB files with equal channels
    summary = survey(tmp_path)
    assert summary.mask_kind == "binary" and dict(summary.channels) == {3: 3} and not summary.colour
    assert sorted(summary.extents.tolist()) == [20, 20, 20, 20, 20, 20]
    assert choose_targets(summary)[0] == "foreground"


def test_unreadable_pairs_are_named(make_dataset):
    root = make_dataset(count=3, shape=(64, 64))
    tifffile.imwrite(root / "masks" / "nuclei_001.tif", np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError, match="nuclei_001.tif: mask is"):
        survey(root)


def test_plan_fills_the_budget_and_its_config_trains(make_dataset, tmp_path):
    summary = survey(make_dataset(count=6, shape=(96, 96)))
    plan = make_plan(summary, budget_seconds=600, widths=(4, 8), batch_sizes=(2,), bf16=False)
    assert plan.in_channels == 1 and plan.targets == "boundary" and plan.precision == "32-true"
    assert plan.width in (4, 8) and plan.batch_size == 2 and plan.epochs >= 3
    assert 0.5 * 600 <= plan.estimate_seconds <= 1.1 * 600  # filled, not exceeded
    config = plan_config(plan, str(tmp_path / "run"))
    assert config["model"]["net"]["init_args"] == {"depth": plan.depth, "width": plan.width}  # channels: data's
    assert config["trainer"]["max_time"] == "00:00:12:30"  # the budget + 25%, a backstop
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = TrainCLI(SegmentationModule, SegmentationDataModule, run=False, args=["--config", str(path)])
    assert cli.model.net.config["in_channels"] == 1 and cli.model.net.config["classes"] == 3
    assert cli.datamodule.tile_size == plan.tile_size and cli.datamodule.border_weights


@pytest.mark.parametrize("native", [True, False])
def test_plan_precision_is_the_one_training_picks(make_dataset, monkeypatch, native):
    """The plan times and writes the precision `unetseg-train` would choose on this machine (one detector)."""
    from unetseg.runtime import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    summary = survey(make_dataset(count=4, shape=(64, 64)))
    plan = make_plan(summary, budget_seconds=120, widths=(4,), batch_sizes=(2,))
    assert plan.precision == precision.trainer_precision("cpu") == ("bf16-mixed" if native else "32-true")


def test_plan_times_and_writes_the_chosen_architecture(make_dataset, tmp_path):
    summary = survey(make_dataset(count=4, shape=(80, 80)))
    architecture = {"block": "dense", "skip": "nested"}
    plan = make_plan(summary, budget_seconds=300, widths=(4,), batch_sizes=(2,), bf16=False, architecture=architecture)
    init_args = plan_config(plan, str(tmp_path / "run"))["model"]["net"]["init_args"]
    assert init_args == {"depth": plan.depth, "width": 4, "block": "dense", "skip": "nested"}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_config(plan, str(tmp_path / "run"))))
    cli = TrainCLI(SegmentationModule, SegmentationDataModule, run=False, args=["--config", str(path)])
    assert cli.model.net.config["block"] == "dense" and cli.model.net.config["skip"] == "nested"


def test_plan_command_writes_a_commented_config(make_dataset, tmp_path, capsys):
    root = make_dataset(count=4, shape=(80, 80))
    out = tmp_path / "configs" / "mine.yaml"
    status = plan_cli.main([str(root), "--budget", "5m", "--widths", "4", "--batch-sizes", "2", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    for words in ("4 image/mask pairs", "targets: boundary", "tile_size:", "depth:", "estimated training time"):
        assert words in printed
    assert f"train with:  unetseg-train --config {out}" in printed
    text = out.read_text()
    assert text.startswith("# Written by `unetseg-plan") and "# estimated training time" in text
    assert yaml.safe_load(text)["data"]["root"] == str(root.resolve())


def test_plan_command_errors_in_one_line(tmp_path, capsys):
    assert plan_cli.main([str(tmp_path / "nowhere")]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unetseg-plan: ")]
    assert error.startswith("unetseg-plan: error: ") and "nowhere/images: folder not found" in error
    assert plan_cli.main([str(tmp_path), "--budget", "soon"]) == 2
    assert "--budget 'soon'" in capsys.readouterr().err


@pytest.fixture
def fixed_timing(monkeypatch):
    """This machine's timings replaced by constants: 0.05 s a step, 0.01 s a validation tile, no data time."""
    from unetseg.planning import plan as planning

    monkeypatch.setattr(planning, "time_step", lambda *args, **kwargs: 0.05)
    monkeypatch.setattr(planning, "time_forward", lambda *args, **kwargs: 0.01)
    monkeypatch.setattr(planning, "time_data", lambda *args, **kwargs: 0.0)


def test_folds_share_the_budget(make_dataset, fixed_timing, tmp_path):
    """--folds K: each fold is planned for budget / K, validates on its own fold and trains fold 0 where unetseg-cv
    puts it; the config trains as unetseg-cv runs it (--data.fold overriding the config's fold)."""
    summary = survey(make_dataset(count=10, shape=(96, 96)))
    one = make_plan(summary, budget_seconds=3000, widths=(4,), batch_sizes=(2,), bf16=False)
    five = make_plan(summary, budget_seconds=3000, widths=(4,), batch_sizes=(2,), bf16=False, folds=5)
    assert five.folds == 5 and five.trainings == 5 and five.budget_seconds == 600 and one.budget_seconds == 3000
    assert 0.5 * 600 <= five.estimate_seconds <= 1.1 * 600  # one fold fills its share
    assert 4 <= one.steps / five.steps <= 6  # about K times fewer steps per fold (each fold starts up anew)
    assert 0.85 * one.steps <= 5 * five.steps <= one.steps  # ... and the K folds together about as many
    config = plan_config(five, str(tmp_path / "cv"))
    assert config["data"]["folds"] == 5 and config["data"]["fold"] == 0 and "val_fraction" not in config["data"]
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "cv" / "fold_0")
    assert config["trainer"]["max_time"] == "00:00:12:30"  # a fold's share + 25%
    assert "val_fraction" in plan_config(one, str(tmp_path / "run"))["data"]
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = TrainCLI(
        SegmentationModule, SegmentationDataModule, run=False, args=["--config", str(path), "--data.fold", "3"]
    )
    assert cli.datamodule.folds == 5 and cli.datamodule.fold == 3


def test_plan_command_with_folds_prints_the_cv_commands(make_dataset, fixed_timing, tmp_path, capsys):
    root = make_dataset(count=6, shape=(80, 80))
    out, work = tmp_path / "cv.yaml", tmp_path / "cv"
    argv = [str(root), "--budget", "30m", "--folds", "3", "--widths", "4", "--batch-sizes", "2", "--out", str(out)]
    assert plan_cli.main([*argv, "--run-dir", str(work)]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation: 3 folds share the budget of 30 min: each fold trains for 10 min" in printed
    assert "for a budget of 10 min per fold" in printed and "all 3 folds:" in printed
    assert f"unetseg-cv train {out} {root} --folds 3 --work {work}" in printed
    assert f"unetseg-cv score {work} {root}" in printed and f"unetseg-cv ensemble {work} " in printed
    assert "unetseg-train --config" not in printed
    text = out.read_text()
    assert "--folds 3`" in text.splitlines()[0] and f"# train the 3 folds with:  unetseg-cv train {out}" in text
    assert yaml.safe_load(text)["data"]["folds"] == 3


@pytest.mark.parametrize("folds", ["1", "0", "-3", "two"])
def test_plan_refuses_fewer_than_two_folds(folds, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_cli.main([str(tmp_path), "--folds", folds])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    expected = "expected an integer >= 2" if folds == "two" else f"got {folds}; cross-validation needs 2 or more folds"
    assert error.startswith("unetseg-plan: error: argument --folds: ") and expected in error


def test_plan_refuses_more_folds_than_images(make_dataset, fixed_timing):
    summary = survey(make_dataset(count=3, shape=(64, 64)))
    with pytest.raises(ValueError, match="--folds 4: 3 image pairs cannot make 4 folds"):
        make_plan(summary, budget_seconds=600, widths=(4,), batch_sizes=(2,), bf16=False, folds=4)
    with pytest.raises(ValueError, match="--folds 1: cross-validation needs 2 or more folds"):
        make_plan(summary, budget_seconds=600, widths=(4,), batch_sizes=(2,), bf16=False, folds=1)
