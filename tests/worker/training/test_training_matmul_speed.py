"""Is bf16 worth it on this CPU? The measurement and the warning a bf16 job gets when not."""

from __future__ import annotations

import torch

from worker.training.matmul_speed import (
    BF16_SLOWER_BELOW,
    bf16_warning,
    cpu_bf16_speedup,
    matmul_gflops,
)


def test_the_warning_comes_only_when_bf16_is_the_slower_choice() -> None:
    warning = bf16_warning(0.52)  # a Xeon without AMX
    assert warning is not None
    assert "0.52x" in warning and "training.precision fp32" in warning
    assert bf16_warning(2.2) is None  # AMD Zen 4 (AVX-512 BF16)
    assert bf16_warning(BF16_SLOWER_BELOW) is None


def test_the_speedup_is_measured_once_per_process() -> None:
    assert matmul_gflops(torch.float32, n=64, repeats=1, inner=1) > 0
    speedup = cpu_bf16_speedup()
    assert 0 < speedup < 100
    assert cpu_bf16_speedup() == speedup  # cached: a worker pays for it once
