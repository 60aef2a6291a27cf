"""The studies' --quick runs (experiments/degradation.py, experiments/compare.py): reports with
± and seed counts, stored cells with finite numbers, reruns that skip finished cells, refused
mismatches."""

import json
import logging
import math
from pathlib import Path

import pytest

from experiments import compare, degradation, degradation_cells, degradation_report
from experiments.study import CellStore, difference, pm
from unetseg.synthetic import make_nuclei_dataset


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory) -> Path:
    """Six small synthetic image/mask pairs: five for training, one held out."""
    return make_nuclei_dataset(tmp_path_factory.mktemp("nuclei"), count=6, shape=(96, 96))


def numbers(value):
    """Every number in a nested JSON structure."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


def cells_ran(caplog) -> int:
    """Cells the last run trained, from its log lines ('[k/n] KEY done in ...')."""
    return sum(record.getMessage().startswith("[") for record in caplog.records)


def test_degradation_quick_writes_report_with_seeds_and_resumes(nuclei, tmp_path, caplog):
    out = tmp_path / "degradation"
    arguments = ["--quick", "--data", str(nuclei), "--out", str(out), "--jobs", "2"]
    with caplog.at_level(logging.INFO):
        degradation.main(arguments)
    stored = json.loads((out / "degradation.json").read_text())
    expected = {
        degradation.cell_key(block, norm, blocks, seed)
        for block in ("plain", "residual", "dense")
        for norm in ("none", "batch")
        for blocks in (1, 2)
        for seed in (0, 1)
    }
    assert set(stored["cells"]) == expected
    for cell in stored["cells"].values():
        assert cell["diverged_at"] is None
        assert len(cell["grad_init"]) == len(cell["grad_trained"]) == len(cell["layers"]) > 10
        for key in ("final_loss", "val_dice", "grad_ratio_init", "grad_ratio_trained", "cpu_ms_per_step"):
            assert math.isfinite(cell[key]), key
        assert all(math.isfinite(number) for number in numbers(cell))
        assert 0 <= cell["val_dice"] <= 1
    deeper = stored["cells"][degradation.cell_key("plain", "none", 2, 0)]
    shallow = stored["cells"][degradation.cell_key("plain", "none", 1, 0)]
    assert len(deeper["layers"]) > len(shallow["layers"])  # one gradient norm per convolution
    assert deeper["params"] > shallow["params"]
    assert len(stored["sessions"]) == 1 and stored["sessions"][0]["cells_run"] == 24

    report = (out / "degradation.md").read_text()
    assert "python -m experiments.degradation --quick" in report and "minutes of wall time" in report
    assert "| plain | none | 2 | 20 | 2 | 0 |" in report  # block, norm, blocks/level, convs, seeds, diverged
    assert report.count(" ± ") > 24
    assert "## Reading" in report and "Does batch norm alone prevent the degradation" in report
    assert "Where the shallow nets level off" in report and "of the fall" in report
    for name in ("degradation.png", "degradation_curves.png", "degradation_gradients.png"):
        assert (out / name).stat().st_size > 10_000

    caplog.clear()
    with caplog.at_level(logging.INFO):
        degradation.main(arguments)  # everything done: nothing trains, the report is rewritten
    assert cells_ran(caplog) == 0
    assert "24 of 24 cells already done" in caplog.text
    again = json.loads((out / "degradation.json").read_text())
    assert again["cells"] == stored["cells"]
    assert [s["cells_run"] for s in again["sessions"]] == [24, 0]

    caplog.clear()
    with caplog.at_level(logging.INFO):  # a third seed adds only its cells
        degradation.main([*arguments, "--seeds", "3", "--blocks", "plain", "--norms", "none", "--jobs", "1"])
    assert cells_ran(caplog) == 2
    report = (out / "degradation.md").read_text()
    assert "| plain | none | 1 | 10 | 3 | 0 |" in report

    with pytest.raises(ValueError, match="other settings.*steps"):
        degradation.main([*arguments, "--steps", "13"])
    (out / "degradation.md").unlink()
    degradation.main(["--report-only", "--out", str(out)])  # the protocol comes from the JSON
    assert "| plain | none | 1 | 10 | 3 | 0 |" in (out / "degradation.md").read_text()


def test_compare_quick_has_dense_and_nested_rows_with_seeds(nuclei, tmp_path, caplog):
    out = tmp_path / "compare"
    arguments = ["--quick", "--data", str(nuclei), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        compare.main(arguments)
    stored = json.loads((out / "comparison.json").read_text())
    trained = {key for key in stored["cells"] if key.startswith("train:")}
    assert trained == {f"train:{name} seed={seed}" for name in compare.VARIANTS for seed in (0, 1)}
    assert len([key for key in stored["cells"] if key.startswith("gradients:")]) == 16
    assert "otsu:otsu + watershed" in stored["cells"]
    for key in trained:
        cell = stored["cells"][key]
        for name in ("dice", "dsb_score", "f1", "params", "gflops", "cpu_ms_per_step", "infer_mpx_per_s"):
            assert math.isfinite(cell[name]) and cell[name] >= 0, (key, name)
        assert cell["train_loss"], key
    assert all(math.isfinite(number) for number in numbers(stored["cells"]))
    nested = stored["cells"]["train:unet skip=nested seed=0"]
    concat = stored["cells"]["train:unet skip=concat seed=0"]
    assert nested["gflops"] > concat["gflops"]  # the UNet++ inner nodes

    report = (out / "comparison.md").read_text()
    assert "python -m experiments.compare --quick" in report
    for name in ("unet skip=nested", "unet dense blocks", "unet skip=add", "unet skip=none", "smp resnet34"):
        assert f"| {name} | 2 | " in report, name
    assert report.count(" ± ") > 20
    assert "Nested (UNet++) skips against concat" in report and "Dense blocks against plain" in report
    for name in ("learning_curves.png", "gradient_norms.png", "examples.png"):
        assert (out / name).stat().st_size > 10_000

    caplog.clear()
    with caplog.at_level(logging.INFO):
        compare.main(arguments)
    assert cells_ran(caplog) == 0
    assert json.loads((out / "comparison.json").read_text())["cells"] == stored["cells"]


def test_store_refuses_a_second_writer(tmp_path):
    store = CellStore(tmp_path / "study.json", {"steps": 1})
    try:
        with pytest.raises(ValueError, match="another run is writing"):
            CellStore(tmp_path / "study.json", {"steps": 1})
    finally:
        store.close()
    CellStore(tmp_path / "study.json", {"steps": 1}).close()


def test_mean_std_and_difference():
    assert pm([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert pm([0.5]) == "0.500" and pm([None, float("nan")]) == "—"
    change, errors = difference([2.0, 2.2, 2.4], [1.0, 1.2, 1.4])
    assert change == pytest.approx(1.0) and errors == pytest.approx(1.0 / math.sqrt(2 * 0.04 / 3))
    assert math.isnan(difference([1.0], [2.0, 3.0])[1])


def test_curve_summary_finds_where_the_loss_levels_off():
    losses = [1.0 * math.exp(-step / 50) + 0.2 for step in range(1000)]
    summary = degradation_cells.curve_summary(losses, last_fraction=0.1)
    assert summary["final_loss"] == pytest.approx(0.2, abs=1e-3)
    assert 100 <= summary["steps_to_90"] <= 130  # exp(-t/50) < 0.1 from t = 115
    assert abs(summary["last_quarter_change"]) < 1e-3
    assert degradation_report.late_share(summary) < degradation_report.LEVELLED_OFF
    still_falling = degradation_cells.curve_summary([1.0 - step / 1000 for step in range(1000)], last_fraction=0.1)
    assert degradation_report.late_share(still_falling) > 0.2


def test_the_sessions_line_says_when_cells_come_from_runs_that_recorded_no_wall_time():
    from experiments.study import sessions_line

    session = {"command": "python -m experiments.degradation", "seconds": 600.0, "cells_run": 2, "machine": "x86_64"}
    cells = {f"cell{i}": {"cpu_seconds": 60.0} for i in range(5)}
    line = sessions_line([session], cells)
    assert line.startswith("Generated by `python -m experiments.degradation` (10.0 min, 2 cells): 10.0 minutes")
    assert " 3 of the cells come from runs stopped before they recorded their wall time, which is not" in line
    assert "(5.0 CPU minutes in the cells)" in line
    assert "stopped" not in sessions_line([session], dict(list(cells.items())[:2]))
