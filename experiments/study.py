"""What the studies share: a resumable store of finished cells, running cells side by side as
one-thread processes, mean +- std over seeds, FLOP counts, and the data a quick run falls back on.

A cell is one training run (a variant and a seed). Its result goes into one JSON file the moment
it finishes, written only by the parent process, so a killed study resumes where it stopped and
a rerun skips what is done. The file also holds the protocol (every setting that changes a
result); a rerun with another protocol is refused rather than mixing incomparable cells.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("study")


class CellStore:
    """The JSON file of one study: its protocol, its finished cells and the sessions that ran them.

    Args:
        path: the JSON file; created on the first save.
        protocol: the settings every cell of this file was run with.

    Raises ValueError when the file exists with another protocol, and when another process
    holds the file's lock (two writers would lose each other's cells).
    """

    def __init__(self, path: Path, protocol: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = (self.path.parent / f".{self.path.name}.lock").open("w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ValueError(
                f"{self.path}: another run is writing this study; wait for it or use another --out"
            ) from None
        self.data = {"protocol": protocol, "cells": {}, "sessions": []}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("protocol") != protocol:
                changed = sorted(
                    key
                    for key in {*protocol, *stored.get("protocol", {})}
                    if protocol.get(key) != stored.get("protocol", {}).get(key)
                )
                self.close()
                raise ValueError(
                    f"{self.path} holds cells run with other settings ({', '.join(changed)}); "
                    "use another --out, or delete the file to start again"
                )
            self.data = stored

    @property
    def cells(self) -> dict[str, dict]:
        return self.data["cells"]

    def add(self, key: str, result: dict) -> None:
        """Store one finished cell and write the file at once."""
        self.cells[key] = result
        self.save()

    def save(self) -> None:
        """Write the file atomically (a kill mid-write leaves the previous version)."""
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(finite_or_none(self.data), indent=1))
        os.replace(temporary, self.path)

    def close(self) -> None:
        self.lock.close()


def stored_protocol(path: Path) -> dict:
    """The protocol of an existing study file (for --report-only, which reruns nothing)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no study here to report on; run it first (without --report-only)")
    return json.loads(Path(path).read_text())["protocol"]


def finite_or_none(value):
    """The same structure with NaN and infinities as None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def one_thread_worker(threads: int) -> None:
    """Pool initialiser: each process computes on `threads` torch threads."""
    torch.set_num_threads(threads)


def run_cells(
    function: Callable,
    cells: Sequence[tuple[str, tuple]],
    store: CellStore,
    jobs: int,
    threads: int = 1,
) -> int:
    """Run `function(*arguments)` for every (key, arguments) not yet in `store`; returns how many ran.

    With jobs > 1 the cells run side by side in `jobs` fresh processes of `threads` torch threads
    each (spawned, so no OpenMP state is inherited); results are stored as each one finishes.
    Cells are given in the order to start them (longest first packs the processes best).
    """
    pending = [(key, arguments) for key, arguments in cells if key not in store.cells]
    skipped = len(cells) - len(pending)
    if skipped:
        log.info("%d of %d cells already done in %s: skipped", skipped, len(cells), store.path)
    started = time.time()

    def finished(done: int, key: str, result: dict) -> None:
        store.add(key, result)
        elapsed = time.time() - started
        log.info(
            "[%d/%d] %s done in %.0f s (%.1f min elapsed, about %.1f min left)",
            done,
            len(pending),
            key,
            result.get("seconds", 0.0),
            elapsed / 60,
            elapsed / done * (len(pending) - done) / 60,
        )

    if jobs <= 1:
        torch.set_num_threads(threads)
        for done, (key, arguments) in enumerate(pending, start=1):
            finished(done, key, function(*arguments))
        return len(pending)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when each spawned process imports it
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=one_thread_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(function, *arguments): key for key, arguments in pending}
        done = 0
        while futures:
            completed, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in completed:
                key = futures.pop(future)
                done += 1
                finished(done, key, future.result())
    return len(pending)


def run_study(
    args,
    argv: Sequence[str] | None,
    module: str,
    store_name: str,
    protocol_keys: Sequence[str],
    make_cells: Callable[[dict], list[tuple[str, tuple]]],
    run: Callable,
    finish: Callable[[dict, dict], None],
) -> None:
    """One study's run: its settings (the arguments, or with --report-only the stored protocol), the cells
    `make_cells(settings)` gives, run side by side (`run_cells`) and recorded as a session, then
    `finish(store data, settings)` writes the report from every stored cell."""
    out = Path(args.out)
    started = time.time()
    if args.report_only:
        settings = stored_protocol(out / store_name)
    else:
        settings = {key: getattr(args, key) for key in protocol_keys}
        settings["data"] = str(data_root(args.data, args.quick))
    store = CellStore(out / store_name, settings)
    try:
        if not args.report_only:
            ran = run_cells(run, make_cells(settings), store, args.jobs, args.threads)
            record_session(store, command_line(module, argv), time.time() - started, ran, args.jobs, args.threads)
        if not store.cells:
            raise SystemExit(f"{store.path}: no finished cells to report")
        finish(store.data, settings)
    finally:
        store.close()


def record_session(store: CellStore, command: str, seconds: float, cells_run: int, jobs: int, threads: int) -> None:
    """Append this invocation (command, wall time, cells it ran) to the store's sessions."""
    store.data["sessions"].append(
        {
            "command": command,
            "seconds": seconds,
            "cells_run": cells_run,
            "jobs": jobs,
            "machine": machine(threads),
            "finished": time.strftime("%Y-%m-%d %H:%M"),
        }
    )
    store.save()


def sessions_line(sessions: list[dict], cells: dict[str, dict]) -> str:
    """One markdown sentence: the commands that made the cells, their wall time and the cells' CPU time."""
    ran = [session for session in sessions if session["cells_run"]] or sessions[-1:]
    commands = "; then ".join(f"`{s['command']}` ({s['seconds'] / 60:.1f} min, {s['cells_run']} cells)" for s in ran)
    total = sum(s["seconds"] for s in ran)
    cpu = sum(cell.get("cpu_seconds") or 0.0 for cell in cells.values())
    machines = sorted({s["machine"] for s in ran})
    unrecorded = len(cells) - sum(s["cells_run"] for s in sessions)
    stopped = (
        f" {unrecorded} of the cells come from runs stopped before they recorded their wall time, which is not in "
        "that figure (their CPU time is)."
        if unrecorded > 0
        else ""
    )
    return (
        f"Generated by {commands}: {total / 60:.1f} minutes of wall time in all ({cpu / 60:.1f} CPU minutes in the "
        f"cells), on {'; '.join(machines)}.{stopped} Rerunning the same command skips finished cells and rewrites "
        "the report."
    )


def machine(threads: int) -> str:
    """The machine in words: architecture, cores, torch threads per process, torch version, GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} with {os.cpu_count()} CPU cores ({threads} torch thread(s) per process), "
        f"torch {torch.__version__}, {gpu}"
    )


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command as typed, for the report."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return f"OMP_NUM_THREADS=1 python -m {module} {' '.join(arguments)}".strip()


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count) of the finite values; NaN where undefined."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std, len(finite)


def pm(values: Iterable[float | None], digits: int = 3) -> str:
    """'mean ± std' of the finite values ('—' when there are none, no ± for a single value)."""
    mean, std, count = mean_std(values)
    if count == 0:
        return "—"
    return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def difference(a: Iterable[float | None], b: Iterable[float | None]) -> tuple[float, float]:
    """(mean(a) - mean(b), that difference in standard errors); NaN where fewer than 2 values each."""
    mean_a, std_a, n_a = mean_std(a)
    mean_b, std_b, n_b = mean_std(b)
    if n_a < 2 or n_b < 2:
        return mean_a - mean_b, math.nan
    change, error = mean_a - mean_b, math.sqrt(std_a**2 / n_a + std_b**2 / n_b)
    if error == 0:  # every seed gave the same value on both sides
        return change, 0.0 if change == 0 else math.copysign(math.inf, change)
    return change, change / error


def in_errors(errors: float) -> str:
    """', +2.3 standard errors' (or why there is no such number), to follow a difference."""
    if math.isnan(errors):
        return ", one seed: no standard error"
    if math.isinf(errors):
        return ", every seed alike on both sides"
    return f", {errors:+.1f} standard errors"


def count_flops(net: nn.Module, in_channels: int, tile_size: int) -> int:
    """Floating-point operations of one forward pass over a (1, C, tile, tile) input, in eval mode.

    Counted on a copy on the meta device: shapes only, no arithmetic, so it costs nothing.
    """
    meta = copy.deepcopy(net).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.zeros(1, in_channels, tile_size, tile_size, device="meta"))
    return counter.get_total_flops()


def data_root(data: str, quick: bool) -> Path:
    """The study's image/mask folder; a quick run without it uses the embedded synthetic nuclei."""
    root = Path(data)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return root.resolve()
    if quick:
        from unetseg.synthetic import default_dataset

        log.info("%s has no images/ and masks/: the quick run uses the synthetic nuclei", root)
        return default_dataset()
    raise ValueError(f"--data {data}: expected a folder with images/ and masks/ (DSB2018: see README, Real data)")


def save_figure(figure, axes, out: Path, legend_size: int = 7) -> Path:
    """Grid and legend on each axis, then a tight PNG at `out` (the figure closed)."""
    import matplotlib.pyplot as plt

    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def add_study_arguments(parser, study: str, unit: str, steps: int) -> None:
    """The options both studies share: data, report folder, --quick, seeds, steps, side-by-side jobs, threads."""
    parser.add_argument("--data", default="../shared/data/dsb2018", help="folder with images/ and masks/")
    parser.add_argument("--out", help=f"report folder (default reports; runs/{study}-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny nets, few steps, 2 seeds: a smoke test in seconds")
    parser.add_argument("--seeds", type=int, help=f"seeds per {unit}, 0 .. N-1 (default 3)")
    parser.add_argument("--steps", type=int, help=f"training steps per {unit}, the same for all (default {steps})")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
