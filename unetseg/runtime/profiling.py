"""Named stages of prediction for `torch.profiler`: where a folder's time goes.

The engine, the labeller and the writers mark their work with `stage(name)`, a
`torch.profiler.record_function` range named `unetseg.<name>`; outside a profiler it costs a
few microseconds. `stage_seconds` turns a finished profile into each stage's own time (its
range less the stages nested in it), so the stages add up to the time they cover.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch.profiler import record_function

__all__ = ["PREFIX", "STAGES", "stage", "stage_seconds"]

PREFIX = "unetseg."
STAGES = ("read", "normalise", "tile", "forward", "blend", "post-process", "write")


def stage(name: str) -> record_function:
    """A profiler range for one of `STAGES`."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    return record_function(PREFIX + name)


def stage_seconds(events: Iterable) -> dict[str, float]:
    """Each stage's own time in seconds, summed over threads, from `profile.events()` (or anything with `name`,
    `thread` and `time_range.start/end` in microseconds): a range less the stage ranges nested in it."""
    ranges = defaultdict(list)  # thread: [(start, end, stage)]
    for event in events:
        if event.name.startswith(PREFIX):
            ranges[event.thread].append((event.time_range.start, event.time_range.end, event.name[len(PREFIX) :]))
    seconds = dict.fromkeys(STAGES, 0.0)
    for spans in ranges.values():
        spans.sort(key=lambda span: (span[0], -span[1]))
        open_spans: list[list] = []  # [end, stage, own time so far]
        for start, end, name in spans:
            while open_spans and open_spans[-1][0] <= start:
                _close(open_spans.pop(), seconds)
            if open_spans:
                open_spans[-1][2] -= end - start  # the enclosing stage does not own this one's time
            open_spans.append([end, name, end - start])
        while open_spans:
            _close(open_spans.pop(), seconds)
    return seconds


def _close(span: list, seconds: dict[str, float]) -> None:
    _, name, own = span
    seconds[name] = seconds.get(name, 0.0) + own / 1e6
