"""How fast this machine multiplies matrices, per dtype: is bf16 worth it on this CPU?

``training.precision: bf16`` runs the population's matmuls in bfloat16. That pays only where
the CPU has fast bf16 matrix instructions: on the project's AMD EPYC (Zen 4, AVX-512 BF16) a
bf16 matmul ran 2.2x as fast as fp32, but on a Xeon without AMX at 0.52x (166 against 320
GFLOP/s), and a bf16 job trained 1.6x slower there than the same job in fp32. The worker
measures the ratio once per process when a bf16 job arrives on the CPU and warns when bf16
is the slower choice (``RuntimeCache``).
"""

from __future__ import annotations

import functools
import time

import torch

BF16_SLOWER_BELOW = 0.9  # bf16 / fp32 speed under which a bf16 job gets a warning


def matmul_gflops(dtype: torch.dtype, n: int = 512, repeats: int = 5, inner: int = 4) -> float:
    """GFLOP/s of an ``n x n`` CPU matmul in ``dtype`` with all intra-op threads (best of
    ``repeats`` timings of ``inner`` products, after a warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / inner)
    return 2 * n**3 / best / 1e9


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 matmul speed over fp32 on this CPU, measured once per process (30-40 ms: the
    ratios that matter, about 0.5 or 2, need no precise timing)."""
    return matmul_gflops(torch.bfloat16, repeats=3, inner=2) / matmul_gflops(
        torch.float32, repeats=3, inner=2
    )


def bf16_warning(speedup: float) -> str | None:
    """What to tell a user whose bf16 job runs on a CPU where bf16 is ``speedup`` x fp32."""
    if speedup >= BF16_SLOWER_BELOW:
        return None
    return (
        f"training.precision bf16: this CPU multiplies bf16 matrices at {speedup:.2f}x its fp32 "
        "speed (it lacks fast bf16 matrix instructions such as AMX), so this job trains slower "
        "than it would with training.precision fp32"
    )
