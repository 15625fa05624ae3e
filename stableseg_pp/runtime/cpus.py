"""How many CPU processes a rank may use: the cores it is allowed on, shared by the ranks of its machine.

``os.sched_getaffinity`` is the cgroup / SLURM allocation (``os.cpu_count`` is the whole machine). DataLoader
workers beyond it only queue for the same cores, and torch warns about each such loader.
"""

from __future__ import annotations

import functools
import logging
import os

from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.errors import ConfigError

log = logging.getLogger(__name__)
MAX_AUTO_WORKERS = 8  # DataLoader workers chosen for ``null``: beyond this, decoding is rarely what a GPU waits for


def cpus_per_rank(ranks_on_machine: int | None = None) -> int:
    """The CPUs this process may use, divided among the ranks on this machine (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = distributed.local_world_size() if ranks_on_machine is None else ranks_on_machine
    return max(1, cpus // max(1, ranks))


def loader_workers(wanted: int | None, setting: str) -> int:
    """DataLoader worker processes for a ``num_workers`` setting: ``null`` = one per CPU of this rank (at most
    :data:`MAX_AUTO_WORKERS`); a number is kept, up to the CPUs of this rank. ``setting``: its key, for the error."""
    if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0):
        raise ConfigError(f"{setting}={wanted}: give a whole number of DataLoader worker processes (0: none), or null")
    cpus = cpus_per_rank()
    if wanted is None:
        return min(cpus, MAX_AUTO_WORKERS)
    if wanted > cpus:
        _log_capped(setting, wanted, cpus)
        return cpus
    return wanted


@functools.cache
def _log_capped(setting: str, wanted: int, cpus: int) -> None:
    log.info("%s=%d: using %d DataLoader workers, the CPUs this rank may use", setting, wanted, cpus)
