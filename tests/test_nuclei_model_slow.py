"""The shipped nuclei model on the 85 held-out DSB2018 images of stage 5 (`nuclei_split.json`), through the
user's commands: its stored post-processing and its scores (README, "The shipped nuclei model"), per image type.
The shipped file is the all-data model (issue 28), which trained on these images too: the scores check that the
file and the user's path give what the README says, not the model's accuracy on unseen images.

Run with `pytest -m slow`; skipped when ../shared/data/dsb2018 (images/, masks/) is absent.
"""

import json
from pathlib import Path

import pytest

from unetseg.cli.evaluate import main as evaluate_main
from unetseg.cli.predict import main as predict_main
from unetseg.inference.loading import load_predictor
from unetseg.weights import model_path

REPO = Path(__file__).resolve().parents[1]
DSB2018 = REPO.parent / "shared" / "data" / "dsb2018"
SPLIT = REPO / "unetseg" / "weights" / "nuclei_split.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DSB2018 / "images").is_dir() or not (DSB2018 / "masks").is_dir(),
        reason=f"{DSB2018} (images/, masks/) is not available",
    ),
]


def link_split(out: Path) -> None:
    for name in json.loads(SPLIT.read_text())["val"]:
        for folder, suffix in (("images", ".png"), ("masks", ".tif")):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f"{name}{suffix}").symlink_to(DSB2018 / folder / f"{name}{suffix}")


def test_shipped_nuclei_model_scores_on_its_held_out_images(tmp_path):
    _, spec = load_predictor(model_path("nuclei"))
    assert spec.postprocess == {"threshold": 0.5, "seed_threshold": 0.7, "min_size": 30}  # from unetseg-tune --tta
    assert spec.tta is True  # predict averages the 8 flips and turns by default
    link_split(tmp_path)
    assert (
        predict_main([str(tmp_path / "images"), str(tmp_path / "pred"), "--model", "nuclei", "--output", "labels"]) == 0
    )
    report = tmp_path / "report.json"
    arguments = [str(tmp_path / "pred"), str(tmp_path / "masks"), "--by-modality", str(tmp_path / "images")]
    assert evaluate_main([*arguments, "--json", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    assert summary["images"] == 85
    # The all-data model, measured 0.923 / 0.622, fluorescence DSB 0.665 (README); room for other CPUs' arithmetic.
    assert summary["dice"] == pytest.approx(0.923, abs=0.005)
    assert summary["dsb_score"] == pytest.approx(0.622, abs=0.005)
    groups = summary["by_modality"]
    assert {name: group["images"] for name, group in groups.items()} == {
        "colour (stained)": 10,
        "fluorescence": 72,
        "grey brightfield": 3,
    }
    assert groups["fluorescence"]["dsb_score"] == pytest.approx(0.665, abs=0.005)
