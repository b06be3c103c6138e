"""How many trials to stack into one population, from the device and the model size.

CPU: stacking pays by turning many small per-op costs into a few big ops, and stops paying
once a step's working set (weights, gradients, two optimizer states, scratch, gathered
inputs: ~``CPU_COPIES`` fp32 copies of the stack) no longer fits the last-level cache, so P
targets a stack of ``L3 bytes / (4 * CPU_COPIES)`` parameters, within [``CPU_MIN``,
``CPU_MAX``]. Measured on this project's 2-core EPYC (32 MiB L3, bench/population_micro.py,
784-128-10 MLP, batch 128, Adam, 2 threads, best of 8 interleaved rounds): % of the fp32
matmul peak was sequential 49-55, P=2 79, P=4 78-88, P=8 83, P=16 75, P=32 70, P=64 67;
the rule gives P=8 there. For a 64-32-10 MLP (1 thread, CPU time) P=64 was best, 16 and 128
slower, hence ``CPU_MAX``. The worker caps this further for jobs whose pruner compares trials
(``worker.loop.pruner_wave_cap``): with denormals flushed, cost per model-epoch barely depends on
P from 8 up, and smaller populations let later ones be pruned against earlier ones.

CUDA: a GPU needs far more parallel work than one MLP of this service offers, so P is as
large as memory allows, up to ``CUDA_MAX`` (per-member bookkeeping per epoch, a few Python
calls each, is what bounds it then).

Both: P never exceeds what fits in a memory budget (a quarter of the available RAM, half of
the free GPU memory) at ``BYTES_PER_PARAM`` per member parameter plus the member's int64
data permutation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CPU_COPIES = 10  # fp32 copies of the stack touched by every step (see module doc)
CPU_MIN, CPU_MAX = 2, 64
DEFAULT_L3_BYTES = 32 * 2**20  # when sysfs does not say
CUDA_MAX = 512
# Memory per member parameter: fp32 weights, gradients, best snapshot, up to two optimizer
# states, scratch, the member's own nn.Sequential and transient copies when members leave.
BYTES_PER_PARAM = 4 * 10
CPU_MEMORY_SHARE = 0.25
CUDA_MEMORY_SHARE = 0.5


def auto_population_size(
    n_parameters_per_member: int, n_train: int, device: torch.device | str
) -> int:
    """P for members of ``n_parameters_per_member`` trainable parameters (see module doc)."""
    if n_parameters_per_member < 1:
        raise ValueError(f"n_parameters_per_member: must be >= 1, got {n_parameters_per_member}")
    device = torch.device(device)
    per_member = BYTES_PER_PARAM * n_parameters_per_member + 8 * max(0, n_train)
    by_memory = memory_budget_bytes(device) // per_member
    if device.type == "cuda":
        return max(1, min(CUDA_MAX, by_memory))
    stack_params = last_level_cache_bytes() // (4 * CPU_COPIES)
    by_cache = stack_params // n_parameters_per_member
    return max(1, min(by_memory, max(CPU_MIN, min(CPU_MAX, by_cache))))


def memory_budget_bytes(device: torch.device | str) -> int:
    """What a population may allocate on ``device``: a quarter of the available RAM, half of
    the free GPU memory (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CUDA_MEMORY_SHARE * free)
    return int(CPU_MEMORY_SHARE * _available_ram())


def last_level_cache_bytes() -> int:
    """The largest CPU cache (L3 on x86) from sysfs; ``DEFAULT_L3_BYTES`` if unknown."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        try:
            if text.endswith("K"):
                sizes.append(int(text[:-1]) * 2**10)
            elif text.endswith("M"):
                sizes.append(int(text[:-1]) * 2**20)
            else:
                sizes.append(int(text))
        except ValueError:
            continue
    return max(sizes, default=DEFAULT_L3_BYTES)


def _available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable; total RAM as a fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


__all__ = [
    "BYTES_PER_PARAM",
    "CPU_COPIES",
    "CPU_MAX",
    "CPU_MIN",
    "CUDA_MAX",
    "auto_population_size",
    "last_level_cache_bytes",
    "memory_budget_bytes",
]
