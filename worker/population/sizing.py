"""How many trials to stack into one population, from the device and the model size.

CPU: a population pays off by making each step's matmuls big enough to run near the BLAS
peak and by sharing the fixed per-step cost (~70 small tensor ops, a few microseconds each)
among P members. Measured on 2 EPYC cores (bench/population_micro.py, 784-128-10 MLP,
batch 128): throughput per member rises steeply up to a stack of a few million parameters
and is flat to slightly lower beyond (the optimizer's passes over the stacked state leave
the cache), and for a 64-32-10 MLP the best P was 64. So P targets a stack of
``CPU_STACK_PARAMS`` parameters, within [``CPU_MIN``, ``CPU_MAX``].

CUDA: a GPU needs far more parallel work than any single MLP of this service offers, so P is
as large as memory allows, up to ``CUDA_MAX`` (per-member Python bookkeeping per epoch is
what bounds it then).

Both: P never exceeds what fits in a memory budget (a quarter of the available RAM, half of
the free GPU memory) at ``BYTES_PER_PARAM`` per member parameter plus the member's int64
data permutation.
"""

from __future__ import annotations

import math
import os

import torch

CPU_STACK_PARAMS = 3_200_000  # 784-128-10 (101,770 params) -> P = 32
CPU_MIN, CPU_MAX = 4, 64  # 64: the measured best for a 64-32-10 MLP; beyond, no gain
CUDA_MAX = 512
# fp32 weights, gradients, best snapshot, up to two optimizer states, scratch, the member's
# own nn.Sequential, and transient copies when members leave: ~9 copies, plus headroom.
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
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        by_memory = int(CUDA_MEMORY_SHARE * free) // per_member
        return max(1, min(CUDA_MAX, by_memory))
    by_memory = int(CPU_MEMORY_SHARE * _available_ram()) // per_member
    by_work = math.ceil(CPU_STACK_PARAMS / n_parameters_per_member)
    return max(1, min(by_memory, max(CPU_MIN, min(CPU_MAX, by_work))))


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
    "CPU_MAX",
    "CPU_MIN",
    "CPU_STACK_PARAMS",
    "CUDA_MAX",
    "auto_population_size",
]
