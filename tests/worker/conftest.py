"""Fixtures shared by the training and population tests."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from worker.training import TensorSplits, to_tensors


@pytest.fixture(scope="session")
def digits() -> TensorSplits:
    """sklearn's 8x8 digits (1797 samples, 64 features, 10 classes), split 1200/300/297."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    perm = np.random.default_rng(0).permutation(len(X))
    X, y = X[perm], y[perm]
    return to_tensors(X[:1200], y[:1200], X[1200:1500], y[1200:1500], X[1500:], y[1500:])
