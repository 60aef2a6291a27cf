"""The peak resident memory of a child process, as the memory benchmarks measure it."""

from __future__ import annotations

import subprocess
import time

# A child sees only this environment (plus what a caller adds): no inherited thread settings.
CHILD_ENV = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}


def child_peak_mb(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a command under GNU time; (its own peak RSS in MB, seconds, the last line it printed).

    GNU time reports the child's own maximum resident set size (ru_maxrss of that child alone;
    RUSAGE_CHILDREN in this process would take the maximum over every child so far).
    """
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_KB %M", *command], capture_output=True, text=True, env=env or CHILD_ENV
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    lines = (done.stdout + done.stderr).strip().splitlines()
    peak_kb = int(next(line for line in lines if line.startswith("PEAK_KB")).split()[1])
    last = [line for line in lines if not line.startswith("PEAK_KB")]
    return peak_kb / 1024, seconds, last[-1] if last else ""
