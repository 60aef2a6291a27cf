"""unetseg-evaluate on small folder trees of PNG and TIFF masks."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from unetseg.cli.evaluate import main
from unetseg.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, mask, check_contrast=False)


def write_tif(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, mask)


def two_squares() -> np.ndarray:
    """Binary 0/255 mask, 20x20, with two separate 4x4 squares."""
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = 255
    mask[10:14, 10:14] = 255
    return mask


def square(shift: int = 0) -> np.ndarray:
    """uint16 label image, 30x30, with one 10x10 object (label 3), shifted right by `shift` columns."""
    labels = np.zeros((30, 30), np.uint16)
    labels[5:15, 5 + shift : 15 + shift] = 3
    return labels


@pytest.fixture
def tree(tmp_path):
    """GT as PNG/TIFF, predictions as TIFF: two good pairs, a missing prediction, a shape mismatch, an orphan."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_png(gt / "a.png", two_squares())
    write_tif(pred / "a.tif", (two_squares() > 0).astype(np.uint8))  # perfect, as a 0/1 mask
    write_tif(gt / "sub" / "b.tif", square())
    write_tif(pred / "sub" / "b.tif", square(shift=2))  # IoU 80 / 120
    write_png(gt / "c.png", two_squares())  # no prediction
    write_png(gt / "d.png", two_squares())
    write_tif(pred / "d.tif", np.zeros((20, 21), np.uint8))  # wrong shape
    write_tif(pred / "extra.tif", two_squares())  # no GT
    write_tif(pred / ".hidden" / "c.tif", two_squares())  # hidden folders are not searched
    return pred, gt


def test_tree_with_problems(tree, tmp_path, capsys):
    pred, gt = tree
    json_path, csv_path = tmp_path / "out" / "scores.json", tmp_path / "out" / "scores.csv"
    code = main([str(pred), str(gt), "--json", str(json_path), "--per-image", str(csv_path)])
    out, err = capsys.readouterr()
    assert code == 1

    # stderr names every file that was not scored, with the reason.
    assert f"missing prediction: GT {gt / 'c.png'}" in err
    assert f"shape mismatch: prediction {pred / 'd.tif'} is (20, 21), GT {gt / 'd.png'} is (20, 20)" in err
    assert f"no ground truth: prediction {pred / 'extra.tif'}" in err
    assert "1 GT image(s) without prediction, 1 shape mismatch(es), 0 unreadable" in err
    assert ".hidden" not in err + out

    document = json.loads(json_path.read_text())
    assert set(document["images"]) == {"a", "sub/b"}
    perfect, shifted = document["images"]["a"], document["images"]["sub/b"]
    assert perfect["gt"] == str(gt / "a.png") and perfect["pred"] == str(pred / "a.tif")
    assert perfect["dice"] == 1.0 and perfect["dsb_score"] == 1.0 and perfect["tp"] == 2
    assert shifted["iou"] == pytest.approx(80 / 120) and shifted["dice"] == pytest.approx(0.8)
    assert shifted["dsb_score"] == pytest.approx(0.4) and shifted["tp"] == 1
    summary = document["summary"]
    assert summary["images"] == 2
    assert summary["dice"] == pytest.approx((1.0 + 0.8) / 2)
    assert summary["dsb_score"] == pytest.approx((1.0 + 0.4) / 2)
    # Pooled: pred 32 + 100, GT 32 + 100, overlap 32 + 80 pixels.
    assert summary["pooled_dice"] == pytest.approx(2 * 112 / 264)
    problems = document["problems"]
    assert problems["missing_predictions"] == [{"image": "c", "gt": str(gt / "c.png")}]
    assert problems["predictions_without_gt"] == [{"image": "extra", "pred": str(pred / "extra.tif")}]
    assert problems["shape_mismatches"][0]["pred_shape"] == [20, 21]
    assert problems["unreadable"] == []

    with csv_path.open(newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "a": "ok",
        "sub/b": "ok",
        "c": "missing prediction",
        "d": "shape mismatch",
        "extra": "no ground truth",
    }
    assert float(rows["sub/b"]["iou"]) == pytest.approx(80 / 120)
    assert int(rows["a"]["n_gt"]) == 2 and rows["c"]["dice"] == ""

    # The table shows both images and the mean.
    assert "sub/b" in out and "mean of 2 images" in out and "pooled Dice (all pixels): 0.848" in out


def test_all_paired_exits_zero(tmp_path, capsys):
    write_png(tmp_path / "gt" / "a.png", two_squares())
    write_tif(tmp_path / "pred" / "a.tif", two_squares())
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "mean of 1 images" in out and "TP 2, FP 0, FN 0" in out


def test_two_files_pair_whatever_their_names(tmp_path, capsys):
    write_tif(tmp_path / "prediction.tif", square(shift=2))
    write_tif(tmp_path / "truth.tif", square())
    json_path = tmp_path / "scores.json"
    assert main([str(tmp_path / "prediction.tif"), str(tmp_path / "truth.tif"), "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["images"]["truth"]["iou"] == pytest.approx(80 / 120)


def test_unreadable_file_is_named(tmp_path, capsys):
    write_png(tmp_path / "gt" / "a.png", two_squares())
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "a.png").write_bytes(b"")
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    err = capsys.readouterr().err
    assert f"unreadable: {tmp_path / 'pred' / 'a.png'}: file is empty" in err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "no such file or folder"),
        (lambda root: (root / "gt").mkdir(), "no image files"),
        (
            lambda root: [write_png(root / "gt" / "a.png", two_squares()), write_tif(root / "gt" / "a.tif", square())],
            "have the same name",
        ),
    ],
)
def test_usage_errors_exit_two(tmp_path, capsys, make, message):
    write_tif(tmp_path / "pred" / "a.tif", two_squares())
    make(tmp_path)
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetseg-evaluate: error: GT") and message in err


def test_many_images_show_only_the_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "MAX_TABLE_ROWS", 1)
    for name in ("a", "b"):
        write_png(tmp_path / "gt" / f"{name}.png", two_squares())
        write_tif(tmp_path / "pred" / f"{name}.tif", two_squares())
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    out = capsys.readouterr().out
    assert "(2 images: per-image rows in --per-image CSV or --json)" in out
    assert "\na " not in out and "mean of 2 images" in out


@pytest.mark.parametrize("command", [["-m", "unetseg.cli.evaluate"], ["-m", "unetseg", "evaluate"]])
def test_module_runs_main(tmp_path, command):
    write_png(tmp_path / "gt" / "a.png", two_squares())
    result = subprocess.run(
        [sys.executable, *command, str(tmp_path / "pred"), str(tmp_path / "gt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "PRED" in result.stderr and "no such file or folder" in result.stderr


def test_pq_aji_and_scores_by_modality(tmp_path, capsys):
    gt, pred, images = tmp_path / "gt", tmp_path / "pred", tmp_path / "images"
    for name in ("dark", "bright", "pink"):
        write_tif(gt / f"{name}.tif", square())
        write_tif(pred / f"{name}.tif", square(shift=2 if name == "pink" else 0))  # IoU 80 / 120 for pink
    grey = np.zeros((30, 30, 3), np.uint8)
    write_png(images / "dark.png", grey + 10)  # fluorescence: dark and grey
    write_png(images / "bright.png", grey + 220)  # grey brightfield
    pink = grey.copy()
    pink[..., 0], pink[..., 2] = 230, 150
    write_png(images / "pink.png", pink)  # stained tissue
    report = tmp_path / "r.json"
    assert main([str(pred), str(gt), "--by-modality", str(images), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "PQ" in out and "AJI" in out
    by_modality = json.loads(report.read_text())["summary"]["by_modality"]
    assert {name: group["images"] for name, group in by_modality.items()} == {
        "colour (stained)": 1,
        "fluorescence": 1,
        "grey brightfield": 1,
    }
    assert by_modality["fluorescence"]["pq"] == 1.0 and by_modality["fluorescence"]["aji"] == 1.0
    assert by_modality["colour (stained)"]["pq"] == pytest.approx(80 / 120)  # one match, SQ 2/3, RQ 1
    assert by_modality["colour (stained)"]["aji"] == pytest.approx(80 / 120)


def test_overlay_pictures_beside_predictions_are_not_predictions(tmp_path, capsys):
    """`unetseg-predict --overlay` writes <stem>_overlay.png beside <stem>.tif; evaluate ignores those,
    but a lone *_overlay.png (no prediction of that stem) is still a prediction without GT."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_tif(gt / "a.tif", square())
    write_tif(pred / "a.tif", square())
    write_png(pred / "a_overlay.png", np.zeros((30, 30, 3), np.uint8))
    write_png(pred / "lone_overlay.png", two_squares())
    assert main([str(pred), str(gt), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [entry["image"] for entry in report["problems"]["predictions_without_gt"]] == ["lone_overlay"]
    assert "1 prediction(s) without GT" in capsys.readouterr().out


def test_several_outputs_of_one_image_score_by_their_labels_else_their_mask(tmp_path):
    """`unetseg-predict --output labels prob mask` writes <stem>_labels/_prob/_mask; evaluate scores
    <stem>_labels against <stem>, the mask when there are no labels, and reports no sibling as a
    prediction without GT."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for name in ("a", "b"):
        write_tif(gt / f"{name}.tif", square())
    write_tif(pred / "a_labels.tif", square())
    write_tif(pred / "a_mask.tif", np.zeros((30, 30), np.uint8))  # would score 0
    write_tif(pred / "a_prob.tif", np.zeros((3, 30, 30), np.float32))
    write_tif(pred / "b_mask.tif", square(shift=5))
    write_tif(pred / "b_prob.tif", np.zeros((3, 30, 30), np.float32))
    write_png(pred / "b_overlay.png", np.zeros((30, 30, 3), np.uint8))  # --overlay: <stem>_overlay.png
    assert main([str(pred), str(gt), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert Path(report["images"]["a"]["pred"]).name == "a_labels.tif"
    assert report["images"]["a"]["dice"] == 1.0
    assert Path(report["images"]["b"]["pred"]).name == "b_mask.tif"
    assert report["images"]["b"]["dice"] == pytest.approx(0.5)  # 10x10 squares overlapping 5 columns
    assert report["problems"]["predictions_without_gt"] == []


def test_a_prediction_named_like_its_gt_wins_over_several_outputs(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_tif(gt / "a.tif", square())
    write_tif(pred / "a.tif", square())
    write_tif(pred / "a_labels.tif", np.zeros((30, 30), np.uint16))
    assert main([str(pred), str(gt), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert Path(report["images"]["a"]["pred"]).name == "a.tif"
    assert [entry["image"] for entry in report["problems"]["predictions_without_gt"]] == ["a_labels"]
