"""Small real datasets, built in memory so the folder runs in seconds on 2 CPU cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from worker.training import TensorSplits

_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, so a second OpenMP thread only adds
    fork/join latency per op (and stalls for milliseconds whenever another process holds
    the other core). Both paths being compared always run with the same count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def default_threads(_one_thread: None) -> int:
    """Opt back into torch's default thread count, to cover the multi-threaded kernels."""
    torch.set_num_threads(_DEFAULT_THREADS)
    return _DEFAULT_THREADS


@pytest.fixture(scope="session")
def small_digits(digits: TensorSplits) -> TensorSplits:
    """The first 400 training rows of ``digits`` (same val/test): cheap multi-epoch runs."""
    return TensorSplits(
        X_train=digits.X_train[:400],
        y_train=digits.y_train[:400],
        X_val=digits.X_val,
        y_val=digits.y_val,
        X_test=digits.X_test,
        y_test=digits.y_test,
        n_classes=digits.n_classes,
    )
