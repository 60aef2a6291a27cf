"""unetseg-cv end to end on a tiny synthetic dataset: two folds trained, every image scored out of fold exactly
once by the final checkpoint of the fold that did not train on it, post-processing tuned on those
probabilities, the fold ensemble written with it; a rerun trains nothing again."""

import json

import numpy as np
import pytest
from conftest import QUIET

from unetseg.cli.cv import main as cv_main
from unetseg.evaluation.crossval import classical_labels
from unetseg.inference.loading import load_predictor
from unetseg.models.ensemble import Ensemble

TINY = ["--trainer.max_epochs", "1", "--data.tiles_per_epoch", "16", "--trainer.logger", "false", *QUIET]


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory):
    from unetseg.synthetic import make_nuclei_dataset

    base = tmp_path_factory.mktemp("cv")
    data = make_nuclei_dataset(base / "data", count=6, shape=(80, 80))
    work = base / "work"
    assert cv_main(["train", "tiny", str(data), "--folds", "2", "--work", str(work), "-q", "--", *TINY]) == 0
    return data, work


def test_every_image_is_scored_out_of_fold_once_by_the_fold_that_never_trained_on_it(cross_validation, capsys):
    data, work = cross_validation
    assert cv_main(["score", str(work), str(data), "-q"]) == 0
    result = json.loads((work / "cv.json").read_text())
    names = sorted(p.stem for p in (data / "images").iterdir())
    assert sorted(result["per_image"]) == names and result["images"] == 6 and result["folds"] == 2
    for fold in (0, 1):
        split = json.loads((work / f"fold_{fold}" / "split.json").read_text())
        for name in split["val"]:
            assert result["per_image"][name]["fold"] == fold  # predicted by the model that never trained on it
            assert name not in split["train"]
    for variant in ("stored_postprocess", "tuned_postprocess", "classical"):
        scores = result[variant]["scores"]["all"]
        assert scores["images"] == 6 and 0.0 <= scores["dice"] <= 1.0 and 0.0 <= scores["dsb_score"] <= 1.0
    assert (
        result["tuned_postprocess"]["scores"]["all"]["dsb_score"]
        >= result["stored_postprocess"]["scores"]["all"]["dsb_score"] - 1e-9
    )  # tuned on these images: never lower than where it started
    table = (work / "cv.md").read_text()
    assert "| out of fold, stored post-processing | all | 6 |" in table and "Otsu + watershed" in table
    assert "6 images out of fold" in capsys.readouterr().out


def test_the_fold_ensemble_holds_both_final_networks_and_the_tuned_settings(cross_validation, tmp_path):
    data, work = cross_validation
    if not (work / "cv.json").exists():
        assert cv_main(["score", str(work), str(data), "-q"]) == 0
    assert cv_main(["ensemble", str(work), str(tmp_path / "ensemble.ckpt"), "-q"]) == 0
    model, spec = load_predictor(tmp_path / "ensemble.ckpt", "cpu")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    tuned = json.loads((work / "cv.json").read_text())["tuned_postprocess"]["settings"]
    assert spec.postprocess == tuned


def test_a_rerun_skips_finished_folds(cross_validation, capsys):
    data, work = cross_validation
    stamps = [(work / f"fold_{k}" / "checkpoints" / "last.ckpt").stat().st_mtime_ns for k in (0, 1)]
    assert cv_main(["train", "tiny", str(data), "--folds", "2", "--work", str(work), "--", *TINY]) == 0
    assert "none (all finished)" in capsys.readouterr().out
    assert stamps == [(work / f"fold_{k}" / "checkpoints" / "last.ckpt").stat().st_mtime_ns for k in (0, 1)]


def test_score_refuses_an_incomplete_cross_validation(cross_validation, tmp_path, capsys):
    data, work = cross_validation
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "split.json").write_text((work / "fold_1" / "split.json").read_text())
    assert cv_main(["score", str(tmp_path), str(data)]) == 2
    assert "folds [1] found; every fold of one cross-validation is needed" in capsys.readouterr().err


def test_the_classical_reference_finds_bright_and_dark_objects():
    yy, xx = np.indices((60, 60))
    discs = ((yy - 16) ** 2 + (xx - 16) ** 2 < 64) | ((yy - 42) ** 2 + (xx - 40) ** 2 < 81)
    image = np.where(discs, 200, 10).astype(np.uint8)[None]
    assert classical_labels(image).max() == 2
    assert classical_labels(255 - image).max() == 2  # brightfield: dark objects on a bright background
