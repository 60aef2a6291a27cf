"""The epoch lines of `RunReport` on a clock the test controls."""

import logging
from types import SimpleNamespace

from unetseg.training import report
from unetseg.training.report import RunReport


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_trainer(global_step: int) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=True,
        global_step=global_step,
        current_epoch=2,
        max_epochs=10,
        num_training_batches=400,
        estimated_stepping_batches=4000,
        callback_metrics={},
        checkpoint_callbacks=[],
    )


def test_an_epoch_resumed_midway_is_timed_from_the_resume(monkeypatch, caplog):
    # Lightning does not call on_train_epoch_start when it resumes in the middle of an epoch; the
    # epoch line then measured from the clock's zero (the machine's uptime: "10 h 22 min").
    clock = FakeClock(now=36_000.0)
    monkeypatch.setattr(report.time, "perf_counter", clock)
    callback, trainer = RunReport(), fake_trainer(global_step=1000)
    callback.started = clock.now  # as on_fit_start sets it
    callback.on_train_start(trainer, None)
    clock.now += 200.0  # 200 steps of one second
    trainer.global_step = 1200
    with caplog.at_level(logging.INFO, logger="unetseg.train"):
        callback.on_train_epoch_end(trainer, None)
    line = caplog.records[-1].getMessage()
    assert line.startswith("epoch 3/10  step 1200  3 min (validation 0 s)"), line
    assert line.endswith("ETA 47 min"), line  # 2800 steps left at one second each
