"""How many CPUs this process may use (no torch import: the worker supervisor uses it too)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on."""
    # The affinity mask is what a container/cgroup cpuset really grants; cpu_count ignores it.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
