"""unetseg.evaluation.tune and unetseg-tune: post-processing searched on annotated images, stored in the model."""

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch

from unetseg.cli.train import main as train_main
from unetseg.cli.tune import main as tune_main
from unetseg.evaluation.metrics import instance_scores
from unetseg.evaluation.tune import mean_score, tune_postprocess
from unetseg.inference import TilingConfig
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.inference.postprocess import to_labels
from unetseg.models.checkpoint import (
    read_checkpoint,
    save_checkpoint,
    slim_checkpoint,
    store_postprocess,
)
from unetseg.spec import POSTPROCESS_DEFAULTS, InputSpec, label_settings
from unetseg.synthetic import nuclei_image
from unetseg.training.targets import make_target


def discs(shape=(64, 64), centres=((16, 16), (16, 40), (44, 28)), radius=7) -> np.ndarray:
    rows, cols = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for label, (cy, cx) in enumerate(centres, start=1):
        labels[(rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2] = label
    return labels


def faint_boundary_probs(labels: np.ndarray, level: float = 0.4) -> np.ndarray:
    """(3, H, W) background/interior/edge probabilities of a model that is right but under-confident:
    every object's foreground probability is `level`, below the default threshold of 0.5."""
    probs = np.zeros((3, *labels.shape), np.float32)
    foreground = labels > 0
    probs[1][foreground] = level
    probs[0] = 1.0 - probs[1]
    return probs


def test_tuning_finds_the_threshold_that_the_default_misses():
    cases = [(faint_boundary_probs(discs()), discs())] * 2
    assert mean_score(cases, label_settings()) == 0.0  # threshold 0.5: nothing is found
    result = tune_postprocess(cases)
    assert result.start_score == 0.0
    assert result.settings["threshold"] < 0.4
    assert result.score == pytest.approx(1.0)
    assert result.trials[0] == (label_settings(), 0.0)


def test_tuning_keeps_the_start_when_nothing_is_better():
    labels = discs()
    probs = faint_boundary_probs(labels, level=0.9)  # already perfect at the defaults
    result = tune_postprocess([(probs, labels)], grid={"threshold": (0.5, 0.6)})
    assert result.settings == label_settings()
    assert result.score == result.start_score == pytest.approx(1.0)


def test_min_size_tuning_removes_specks():
    labels = discs()
    probs = faint_boundary_probs(labels, level=0.9)
    probs[1, 60:62, 2:4] = 0.9  # a 4-pixel false object
    probs[0] = 1.0 - probs[1]
    result = tune_postprocess([(probs, labels)], start={"min_size": 0}, grid={"min_size": (0, 10)})
    assert result.start_score < 1.0
    assert result.settings["min_size"] == 10 and result.score == pytest.approx(1.0)


def test_label_settings_merge_defaults_stored_and_overrides():
    assert label_settings() == POSTPROCESS_DEFAULTS
    stored = {"threshold": 0.4, "min_size": 30}
    assert label_settings(stored) == {"threshold": 0.4, "seed_threshold": None, "min_size": 30}
    merged = label_settings(stored, threshold=0.6, seed_threshold=None, min_size=5)
    assert merged == {"threshold": 0.6, "seed_threshold": None, "min_size": 5}
    with pytest.raises(ValueError, match="unknown post-processing settings \\['bogus'\\]"):
        label_settings({"bogus": 1})
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        label_settings(threshold=1.5)


def test_predict_settings_use_the_models_stored_postprocessing():
    spec = InputSpec(1, targets="boundary", classes=3, postprocess={"threshold": 0.3, "min_size": 40})
    assert PredictSettings(output="labels").label_options(spec) == {
        "threshold": 0.3,
        "seed_threshold": None,
        "min_size": 40,
    }
    flags = PredictSettings(output="labels", threshold=0.7, seed_threshold=0.8, min_size=2)
    assert flags.label_options(spec) == {"threshold": 0.7, "seed_threshold": 0.8, "min_size": 2}
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_cli_tunes_a_checkpoint_and_stores_the_result(checkpoint, shared_dataset, tmp_path, capsys):
    model_file = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, model_file)
    report = tmp_path / "tune.json"
    status = tune_main(
        [str(model_file), str(shared_dataset), "--max-images", "3", "--json", str(report), "--tile-size", "64"]
    )
    assert status == 0
    document = json.loads(report.read_text())
    assert document["images"] == 3
    assert document["best"]["score"] >= document["start"]["score"]
    assert len(document["trials"]) > 10
    _, spec = load_predictor(model_file)
    assert spec.postprocess == document["best"]["settings"]
    assert "wrote" in capsys.readouterr().out
    _, original = load_predictor(checkpoint)
    assert original.postprocess == {}  # --output not given: only the copy was rewritten


def test_cli_dry_run_writes_nothing_and_bad_data_is_a_usage_error(checkpoint, shared_dataset, tmp_path, capsys):
    model_file = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, model_file)
    before = model_file.read_bytes()
    assert tune_main([str(model_file), str(shared_dataset), "--max-images", "1", "--dry-run"]) == 0
    assert model_file.read_bytes() == before
    assert tune_main([str(model_file), str(tmp_path / "nowhere")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_store_postprocess_refuses_unknown_settings(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown post-processing settings"):
        store_postprocess(checkpoint, tmp_path / "x.ckpt", {"thresh": 0.3})
    assert not (tmp_path / "x.ckpt").exists()


def test_distance_targets_split_objects_that_touch_along_a_long_edge():
    # Two touching squares whose shared edge the interior class (3 classes) cannot separate when the
    # edge probability between them is weak; the centre class (4 classes) keeps one seed per object.
    labels = np.zeros((40, 60), np.int32)
    labels[5:35, 5:30] = 1
    labels[5:35, 30:55] = 2
    target = make_target(labels, "distance")
    assert set(np.unique(target)) == {0, 1, 2, 3}
    probs = np.stack([(target == k).astype(np.float32) for k in range(4)])
    probs[1][target == 2] = 1.0  # the edge is missed: it looks like interior
    probs[2] = 0.0
    found = to_labels(probs, min_size=5)
    assert instance_scores(found, labels)["tp"] == 2
    merged = to_labels(np.stack([probs[0], probs[1] + probs[3], probs[2]]), min_size=5)
    assert instance_scores(merged, labels)["tp"] == 0  # 3-class seeds merge them


def test_a_distance_model_trains_predicts_labels_and_tunes(shared_dataset, tmp_path):
    run = tmp_path / "run"
    train_main(
        [
            "--config",
            "tiny",
            "--data.root",
            str(shared_dataset),
            "--data.targets",
            "distance",
            "--model.net.init_args.classes",
            "4",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.max_epochs",
            "1",
            "--data.tiles_per_epoch",
            "8",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    model_file = run / "checkpoints" / "last.ckpt"
    model, spec = load_predictor(model_file)
    assert (spec.targets, spec.classes) == ("distance", 4)
    image, _ = nuclei_image(np.random.default_rng(0), (64, 64))
    tiling = TilingConfig(tile_size=64, overlap=16, batch_size=4)
    labels = predict_image(model, spec, image, PredictSettings(output="labels", tiling=tiling))
    assert labels.shape == (64, 64) and labels.dtype == np.uint16
    assert tune_main([str(model_file), str(shared_dataset), "--max-images", "2", "--tile-size", "64"]) == 0
    assert load_predictor(model_file)[1].postprocess.keys() == POSTPROCESS_DEFAULTS.keys()


def test_slim_checkpoint_keeps_values_beyond_float16_in_float32(checkpoint, tmp_path):
    full = read_checkpoint(checkpoint)
    key = next(name for name in full["state_dict"] if name.endswith("running_var"))
    full["state_dict"][key] = full["state_dict"][key] + 70000.0  # as a long training's BatchNorm can reach
    save_checkpoint(full, tmp_path / "full.ckpt")
    slim = read_checkpoint(slim_checkpoint(tmp_path / "full.ckpt", tmp_path / "slim.ckpt"))
    assert slim["state_dict"][key].dtype == torch.float32
    assert torch.equal(slim["state_dict"][key], full["state_dict"][key])
    weights = [name for name in slim["state_dict"] if name.endswith("weight")]
    assert all(slim["state_dict"][name].dtype == torch.float16 for name in weights)
    load_predictor(tmp_path / "slim.ckpt")  # finite: not refused


def test_tuning_with_tta_stores_it_and_prediction_follows_the_model(checkpoint, shared_dataset, tmp_path, capsys):
    """`unetseg-tune --tta` tunes on flip-averaged probabilities and the model says so: predict then
    averages the 8 flips by default (its thresholds fit those probabilities); --no-tta and
    `TilingConfig(tta=False)` still turn it off, and tuning again without --tta clears it."""
    from unetseg.cli.predict import main as predict_main

    model_file = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, model_file)
    report = tmp_path / "tune.json"
    args = [str(model_file), str(shared_dataset), "--max-images", "2", "--tile-size", "64", "--json", str(report)]
    assert tune_main([*args, "--tta"]) == 0
    assert "2 image(s) with TTA" in capsys.readouterr().out
    assert json.loads(report.read_text())["tta"] is True
    model, spec = load_predictor(model_file)
    assert spec.tta is True and spec.postprocess == json.loads(report.read_text())["best"]["settings"]

    image = nuclei_image(np.random.default_rng(3), (64, 80))[0]

    def probabilities(tta):
        settings = PredictSettings(output="prob", tiling=TilingConfig(tile_size=64, overlap=16, tta=tta))
        return predict_image(model, spec, image, settings)

    by_default, with_tta, without = probabilities(None), probabilities(True), probabilities(False)
    np.testing.assert_array_equal(by_default, with_tta)
    assert np.abs(by_default - without).max() > 1e-4

    source, out = tmp_path / "image.tif", tmp_path / "out"
    tifffile.imwrite(source, image)
    cli = [str(source), str(out / "default.tif"), "--checkpoint", str(model_file), "--output", "prob"]
    assert predict_main([*cli, "--tile-size", "64", "--overlap", "16"]) == 0
    assert "averaging 8 flips and turns of each tile, as this model was tuned" in capsys.readouterr().out
    cli[1] = str(out / "no_tta.tif")
    assert predict_main([*cli, "--tile-size", "64", "--overlap", "16", "--no-tta"]) == 0
    np.testing.assert_allclose(tifffile.imread(out / "default.tif"), with_tta, atol=1e-6)
    np.testing.assert_allclose(tifffile.imread(out / "no_tta.tif"), without, atol=1e-6)

    assert tune_main(args) == 0
    assert load_predictor(model_file)[1].tta is False


def test_the_tta_flag_of_a_spec_round_trips_and_is_checked():
    spec = InputSpec(1, targets="boundary", classes=3, tta=True)
    assert spec.to_dict()["tta"] is True
    assert InputSpec.from_dict(spec.to_dict()) == spec
    plain = InputSpec(1, targets="boundary", classes=3)
    assert "tta" not in plain.to_dict()  # models tuned without it read as before
    assert InputSpec.from_dict(plain.to_dict()).tta is False
    with pytest.raises(ValueError, match="tta must be true or false, got 'yes'"):
        InputSpec.from_dict({**plain.to_dict(), "tta": "yes"})
    with pytest.raises(ValueError, match="tta must be None"):
        TilingConfig(tta=1.5)
