"""Intra-op threads on a CPU: as many as the machine's load leaves free.

torch starts one thread per core. When other processes already keep the cores busy, two
threads on a two-core machine wait for each other at every parallel region (OpenMP spins,
then sleeps; the other thread is descheduled): measured on the 2-core development box at a load
average of 8, a scan's forward + backward took 6-11 s with 2 threads against 0.5 s with 1. A
run therefore uses the cores the 1-minute load average leaves free (at least one). Setting
``OMP_NUM_THREADS`` turns the choice off.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .data import usable_cores

__all__ = ["free_cores", "cpu_threads"]


def free_cores() -> int:
    """Cores of this process's affinity that the 1-minute load average leaves idle (≥ 1).
    The load is the whole machine's, so it is read as a fraction of all its cores."""
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0] / max(1, os.cpu_count() or cores)
    except OSError:  # no load average here (Windows)
        return cores
    return max(1, min(cores, round(cores * (1.0 - min(1.0, busy)))))


@contextlib.contextmanager
def cpu_threads(device: torch.device):
    """For the duration: on a CPU, unless ``OMP_NUM_THREADS`` is set, torch's intra-op threads
    are :func:`free_cores` (never more than now). Yields the thread count (None: untouched)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, free_cores())))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
