"""The datasets that need no file from the user: digits, synthetic, MNIST, Fashion-MNIST.

scikit-learn is imported inside the functions: it costs ~0.7 s of import time (scipy), which
the API process only pays if it ever loads one of these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.datasets.dataset import Dataset, check_limits
from service.datasets.idx import FASHION_MNIST, MNIST, find_split
from service.datasets.spec import SyntheticSpec
from service.errors import DatasetError, LimitExceededError

BUILTIN_DATASETS: list[dict[str, Any]] = [
    {
        "name": "digits",
        "description": "scikit-learn's bundled 8x8 handwritten digits: 1,797 rows, 64 features "
        "scaled to [0, 1], 10 classes.",
        "offline": True,
        "rows": 1797,
        "features": 64,
        "n_classes": 10,
        "options": {},
    },
    {
        "name": "mnist",
        "description": "MNIST handwritten digits from IDX files (28x28 pixels scaled to [0, 1], "
        "10 classes): 60,000 train or 10,000 t10k images. Files live in data_dir/mnist/ or "
        "data_dir/; downloaded when missing and the network is reachable.",
        "offline": False,
        "rows": 60000,
        "features": 784,
        "n_classes": 10,
        "options": {"split": ["auto", "train", "test"], "limit": "int >= 1"},
    },
    {
        "name": "fashion_mnist",
        "description": "Fashion-MNIST clothing images from IDX files (28x28 pixels scaled to "
        "[0, 1], 10 classes): 60,000 train or 10,000 t10k images. Files live in "
        "data_dir/fashion_mnist/; downloaded when missing and the network is reachable.",
        "offline": False,
        "rows": 60000,
        "features": 784,
        "n_classes": 10,
        "options": {"split": ["auto", "train", "test"], "limit": "int >= 1"},
    },
    {
        "name": "synthetic",
        "description": "A seeded sklearn make_classification problem of any size.",
        "offline": True,
        "rows": None,
        "features": None,
        "n_classes": None,
        "options": {
            "n_samples": 1000,
            "n_features": 20,
            "n_classes": 2,
            "n_informative": None,
            "n_clusters_per_class": 2,
            "seed": 0,
        },
    },
]


def describe_builtin_datasets(data_dir: Path | None = None) -> list[dict[str, Any]]:
    """BUILTIN_DATASETS plus ``available``: whether loading works right now without a download."""
    out = []
    for entry in BUILTIN_DATASETS:
        item = dict(entry)
        source = {"mnist": MNIST, "fashion_mnist": FASHION_MNIST}.get(entry["name"])
        if source is None:
            item["available"] = True
        else:
            item["available"] = data_dir is not None and any(
                find_split(source, data_dir, s) is not None for s in ("train", "test")
            )
        out.append(item)
    return out


def load_digits(*, max_rows: int, max_features: int) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits

    check_limits(1797, 64, max_rows=max_rows, max_features=max_features, field="dataset.name")
    bunch = sk_load_digits()
    X = np.ascontiguousarray(bunch.data / 16.0, dtype=np.float32)  # pixel counts are 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(name="digits", X=X, y=y, n_classes=10, class_names=[str(d) for d in range(10)])


def load_synthetic(
    spec: SyntheticSpec,
    *,
    max_rows: int,
    max_features: int,
    limit_error: type[LimitExceededError] = LimitExceededError,
) -> Dataset:
    from sklearn.datasets import make_classification

    check_limits(
        spec.n_samples,
        spec.n_features,
        max_rows=max_rows,
        max_features=max_features,
        field="dataset",
        error=limit_error,
    )
    try:
        X, y = make_classification(
            n_samples=spec.n_samples,
            n_features=spec.n_features,
            n_informative=spec.resolved_n_informative,
            n_redundant=0,
            n_repeated=0,
            n_classes=spec.n_classes,
            n_clusters_per_class=spec.n_clusters_per_class,
            random_state=spec.seed,
        )
    except ValueError as exc:  # the spec validator should have caught it; keep sklearn's words
        raise DatasetError(
            f"make_classification refused the parameters: {exc}", field="dataset"
        ) from None
    return Dataset(
        name="synthetic",
        X=np.ascontiguousarray(X, dtype=np.float32),
        y=np.asarray(y, dtype=np.int64),
        n_classes=spec.n_classes,
        class_names=[str(c) for c in range(spec.n_classes)],
    )
