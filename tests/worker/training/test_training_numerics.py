"""Denormal floats flushed to zero while a worker trains, on every intra-op thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from worker.training.numerics import denormals_flushed, flush_denormals

N = 1024  # big enough that the matmul and the multiply run on every intra-op thread


def run_fresh(code: str) -> list[str]:
    """Run ``code`` in a new interpreter (its own torch thread pool); its printed words."""
    prelude = "import torch\ntorch.set_num_threads(2)\n"
    out = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.split()


COUNT_NONZERO = f"""
def nonzero(a, b):  # entries of denormal @ large and denormal * large that are not zero
    return int(((a @ b) != 0).sum()) + int(((a * b) != 0).sum())
import numpy as np  # numpy builds them on this thread: no torch thread pool started yet
a = torch.from_numpy(np.full(({N}, {N}), 1e-39, dtype=np.float32))  # denormal in fp32
b = torch.from_numpy(np.full(({N}, {N}), 1e10, dtype=np.float32))
"""


def test_a_worker_process_that_switches_first_flushes_on_every_thread() -> None:
    words = run_fresh(
        COUNT_NONZERO
        + """
        from worker.training.numerics import flush_denormals
        with flush_denormals() as everywhere:
            print(everywhere, nonzero(a, b))
        with flush_denormals(False) as everywhere:
            print(everywhere)
        """.replace("\n        ", "\n")
    )
    # Every entry, whichever thread computed it, read its denormal operand as zero (kept, each
    # would be 1e-39 * 1e10 * 1024, a normal float). Threads started inside the block keep
    # flushing after it: switching back is reported as not reaching every thread.
    assert words == ["True", "0", "False"]


def test_threads_started_before_the_switch_keep_denormals_and_it_is_reported() -> None:
    words = run_fresh(
        COUNT_NONZERO
        + """
        nonzero(a, b)  # the intra-op thread pool starts here, keeping denormals
        from worker.training.numerics import flush_denormals
        with flush_denormals() as everywhere:
            print(everywhere, nonzero(a, b))
        """.replace("\n        ", "\n")
    )
    assert words[0] == "False"  # reported, and only part of the products were flushed
    assert 0 < int(words[1]) < 2 * N * N


def test_the_calling_threads_mode_is_restored_even_when_the_body_raises() -> None:
    before = denormals_flushed()
    with flush_denormals(not before):
        assert denormals_flushed() != before
    assert denormals_flushed() == before
    with pytest.raises(RuntimeError), flush_denormals(not before):
        raise RuntimeError("boom")
    assert denormals_flushed() == before
