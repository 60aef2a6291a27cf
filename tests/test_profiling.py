from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from torch.profiler import ProfilerActivity, profile

from unetseg.inference import TilingConfig
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_file
from unetseg.runtime.profiling import STAGES, stage, stage_seconds
from unetseg.synthetic import nuclei_image


def event(name: str, start: int, end: int, thread: int = 1) -> SimpleNamespace:
    """A profiler event as `stage_seconds` reads it (times in microseconds)."""
    return SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end))


def test_a_stage_owns_its_range_less_the_stages_nested_in_it():
    events = [
        event("unetseg.post-process", 0, 1_000_000),
        event("unetseg.write", 200_000, 500_000),  # inside post-process: its own time
        event("aten::add", 250_000, 260_000),  # not a stage: part of write
        event("unetseg.forward", 2_000_000, 2_500_000),
        event("unetseg.forward", 0, 300_000, thread=2),  # another thread adds up
    ]
    seconds = stage_seconds(events)
    assert set(seconds) == set(STAGES)
    assert seconds["post-process"] == pytest.approx(0.7)
    assert seconds["write"] == pytest.approx(0.3)
    assert seconds["forward"] == pytest.approx(0.8)
    assert seconds["read"] == 0.0


def test_an_unknown_stage_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown stage 'decode'; one of read, normalise"):
        stage("decode")


def test_a_profiled_prediction_reports_every_stage_it_runs(tmp_path, checkpoint):
    model, spec = load_predictor(checkpoint)
    image, _ = nuclei_image(np.random.default_rng(0), (150, 130))
    source = tmp_path / "nuclei.tif"
    tifffile.imwrite(source, (image * 4000).astype(np.uint16))
    settings = PredictSettings(output="labels", tiling=TilingConfig(tile_size=64, overlap=16, batch_size=4))
    with profile(activities=[ProfilerActivity.CPU]) as run:
        predict_file(model, spec, source, tmp_path / "labels.tif", settings)
    seconds = stage_seconds(run.events())
    assert all(seconds[name] > 0 for name in STAGES), seconds
    total = sum(seconds.values())
    assert seconds["forward"] > 0.05 * total  # the network is a real share, not swamped by the markers
    assert tifffile.imread(tmp_path / "labels.tif").shape == (150, 130)
