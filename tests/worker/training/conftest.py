"""Small real datasets, built in memory so the whole folder runs in seconds on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest

from worker.training import TensorSplits, to_tensors


@pytest.fixture(scope="session")
def noise() -> TensorSplits:
    """Random features with random labels: a big network can only memorise, so it overfits."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(264, 20)).astype(np.float32)
    y = rng.integers(0, 3, size=264)
    return to_tensors(X[:128], y[:128], X[128:232], y[128:232], X[232:], y[232:])
