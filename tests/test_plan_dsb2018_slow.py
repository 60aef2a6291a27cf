"""unetseg-plan on DSB2018 (real data): what it finds and chooses, and a plan that fills a one-hour budget.

Run with `pytest -m slow`; skipped when ../shared/data/dsb2018 (images/, masks/) is absent. The training
itself (does a plan's run finish within its budget?) is measured, not tested: see the README.
"""

from pathlib import Path

import numpy as np
import pytest

from unetseg.planning.plan import make_plan, plan_config, receptive_field
from unetseg.planning.survey import survey

DSB2018 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DSB2018 / "images").is_dir() or not (DSB2018 / "masks").is_dir(),
        reason=f"{DSB2018} (images/, masks/) is not available",
    ),
]


def test_plan_for_dsb2018(tmp_path):
    summary = survey(DSB2018)
    assert summary.pairs == 564 and summary.colour and summary.mask_kind == "instances"
    assert 15 < np.median(summary.diameters) < 25 and 0.2 < summary.touching < 0.4
    plan = make_plan(summary, budget_seconds=3600, widths=(8, 16), batch_sizes=(8,))
    assert plan.in_channels == 3 and plan.targets == "boundary" and plan.tile_size == 128
    assert plan.depth == 4 and receptive_field(plan.depth) >= 2 * np.percentile(summary.extents, 99)
    assert 0.75 * 3600 <= plan.estimate_seconds <= 1.05 * 3600
    config = plan_config(plan, str(tmp_path / "run"))
    assert config["data"]["border_weights"] and config["trainer"]["max_time"] == "00:01:15:00"
