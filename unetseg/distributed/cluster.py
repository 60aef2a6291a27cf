"""A Dask client from one address: `local:N` (N worker processes on this machine), a running scheduler
(`tcp://host:8786`), or a batch-system cluster of dask-jobqueue (`slurm:N`, `pbs:N`, `lsf:N`...: N jobs)
configured by dask's own configuration (`jobqueue.yaml`, `DASK_JOBQUEUE__SLURM__...`), not a second one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["JOBQUEUE", "connect", "local_threads"]

log = logging.getLogger(__name__)

# address prefix -> dask-jobqueue cluster class
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
}
FORMS = "local:N, tcp://HOST:PORT (a running scheduler), or " + ", ".join(f"{name}[:JOBS]" for name in JOBQUEUE)


def _count(address: str, text: str, default: int | None) -> int:
    """The N of `kind:N`, a positive integer; ValueError naming the address otherwise."""
    if not text and default is not None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--dask {address}: expected a positive count after ':', e.g. local:4; forms: {FORMS}")
    return int(text)


def local_threads(address: str) -> int | None:
    """Torch threads per worker for `local:N`: this machine's cores shared by its N workers; None for other clusters."""
    kind, _, count = address.partition(":")
    if kind != "local":
        return None
    return max(1, (os.cpu_count() or 1) // _count(address, count, None))


@contextmanager
def connect(address: str) -> Iterator:
    """A `distributed.Client` for `address` (see the module docstring), closed (with any cluster it started) on exit.

    `local:N` starts a `LocalCluster` of N single-threaded worker processes; `slurm:N` (and the
    other dask-jobqueue kinds) submits N jobs of the cluster that dask's configuration describes
    (queue, cores, memory, walltime, GPUs: `~/.config/dask/jobqueue.yaml`); anything else is the
    address of a running scheduler. Needs pip install 'unetseg[distributed]'.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise ImportError("--dask needs dask's distributed scheduler: pip install 'unetseg[distributed]'") from error
    kind, _, count = address.partition(":")
    cluster = None
    if kind == "local":
        workers = _count(address, count, None)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
    elif kind in JOBQUEUE:
        try:
            import dask_jobqueue
        except ImportError as error:
            raise ImportError(f"--dask {address} needs dask-jobqueue: pip install 'unetseg[distributed]'") from error
        jobs = _count(address, count, 1)
        try:
            cluster = getattr(dask_jobqueue, JOBQUEUE[kind])()  # everything from dask.config's jobqueue.<kind>
        except ValueError as error:  # cores or memory missing from the configuration
            message = " ".join(str(error).split())
            raise ValueError(
                f"--dask {address}: {message}; set them under jobqueue.{kind} in ~/.config/dask/jobqueue.yaml"
            ) from None
        cluster.scale(jobs=jobs)
    elif not address or ("://" not in address and ":" not in address):
        raise ValueError(f"--dask {address!r}: not a cluster address; forms: {FORMS}")
    try:
        client = Client(cluster if cluster is not None else address)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
