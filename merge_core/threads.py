"""How many threads the merge's arithmetic uses: the one rule, and the one place that applies it.

A merge is three pipelined threads (read-ahead, math, writer) plus torch's intra-op pool for
the math. On a Space the CPUs are shared: torch's default (one pool thread per core) then spins
at every barrier waiting for the slowest thread, so a busy 2-core machine merged the 3B
benchmark in 36 s with the default and in 20.7 s with one math thread. The rule below keeps
the pool small enough that the reader, the writer and the neighbours still get a core.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Benchmarks set this to compare thread counts; the merge itself never needs it.
OVERRIDE_ENV = "MERGE_CORE_MATH_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def math_threads(cores: int | None = None, load: float | None = None) -> int:
    """Half the cores that nobody else is using (cores minus the 1-minute load average), at least one, at
    most eight. Measured on the 3B benchmark (benchmarks/RESULTS.md): with the CPUs busy, one thread is
    the fastest (16 cores: 15.0 s vs 17.4 s with 16 threads; 2 cores: 20.7 s vs 36 s); on 16 quiet cores
    more help (9.7 s with one, 5.7-7.1 s with four, 6.8 s with sixteen). In a container the load average is
    the host's, so a busy host gives one thread: the side that degrades least."""
    cores = usable_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    return max(1, min(8, int(cores - load) // 2))


def chosen_threads() -> int:
    """``math_threads()``, or the benchmarks' override."""
    override = os.environ.get(OVERRIDE_ENV, "").strip()
    return int(override) if override.isdigit() and int(override) > 0 else math_threads()


@contextmanager
def merge_threads(device: torch.device) -> Iterator[int]:
    """Run the block in torch's pool of ``chosen_threads()`` threads (CPU merges), restoring the caller's setting."""
    wanted = chosen_threads()
    if device.type != "cpu":
        yield torch.get_num_threads()  # the accelerator does the math; leave the host's pool alone
        return
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)
