"""unetseg-cv end to end on a tiny synthetic dataset: two folds trained, every image scored out of fold exactly
once by the final checkpoint of the fold that did not train on it, post-processing tuned on those
probabilities, the fold ensemble written with it; a rerun trains nothing again."""

import json

import numpy as np
import pytest
import torch
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


def unseen_images(root, count=2):
    """Synthetic pairs under names no fold of `cross_validation` trained on."""
    from unetseg.synthetic import make_nuclei_dataset

    make_nuclei_dataset(root, count=count, shape=(80, 80), seed=1)
    for path in sorted(root.glob("*/nuclei_*")):
        path.rename(path.with_name("unseen_" + path.name))
    return root


def test_the_mean_of_a_network_in_its_eight_views_is_unetseg_tta(cross_validation):
    from experiments.ensemble_vs_tta import VIEWS, View
    from unetseg.inference.pipeline import PredictSettings, predict_image
    from unetseg.inference.tiling import TilingConfig
    from unetseg.io import read_image

    data, work = cross_validation
    model, spec = load_predictor(work / "fold_0" / "checkpoints" / "last.ckpt", "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # weights far from the barely trained fold's, so the views give different outputs
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    image = read_image(sorted((data / "images").glob("*.tif"))[0])

    def probs(network, tta):
        return predict_image(network, spec, image, PredictSettings("prob", tiling=TilingConfig(tta=tta, amp=False)))

    views = [probs(View(model, view), False) for view in range(VIEWS)]
    assert not np.allclose(views[0], views[1], atol=1e-4)  # the views differ: each is its own pass
    np.testing.assert_allclose(np.mean(views, axis=0), probs(model, True), atol=1e-5)


def test_ensemble_vs_tta_scores_every_variant_on_unseen_images_and_refuses_seen_ones(cross_validation, tmp_path):
    from experiments.ensemble_vs_tta import format_report, run

    data, work = cross_validation
    with pytest.raises(ValueError, match=r"nuclei_000\.png: a fold of .* trained on this image"):
        run(work, data, tile_size=256, limit=1)
    result = run(work, unseen_images(tmp_path / "test"), tile_size=256, limit=None)
    assert result["images"] == 2 and result["folds"] == 2
    rows = {row["variant"]: row for row in result["variants"]}
    expected = {  # passes a tile, instances scored (one per fold, per left-out fold, or the whole ensemble)
        "one network": (1, 2),
        "one network, 4 views (flips)": (4, 2),
        "1-fold ensemble": (1, 2),
        "one network, 8 views (TTA)": (8, 2),
        "1-fold ensemble, 2 views": (2, 2),
        "2-fold ensemble": (2, 1),
        "2-fold ensemble, 8 views (TTA)": (16, 1),
    }
    assert {name: (row["passes"], row["instances"]) for name, row in rows.items()} == expected
    for row in rows.values():
        assert 0.0 <= row["dsb"] <= 1.0 and len(row["image_dsb"]) == 2
    # a 1-fold "ensemble" leaving one fold out is the other fold's network: the same scores as one network
    assert rows["1-fold ensemble"]["dsb"] == pytest.approx(rows["one network"]["dsb"])
    comparison = result["comparisons"][0]
    assert comparison["dsb_difference"] == pytest.approx(
        np.mean(rows[comparison["b"]]["image_dsb"]) - np.mean(rows[comparison["a"]]["image_dsb"])
    )
    assert "| one network, 8 views (TTA) | 8 |" in format_report(result)
