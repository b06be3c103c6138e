"""The fixed, seeded, stratified train/validation/test split of a job, standardized on train.

Every trial of a job must be judged on the same validation rows, so the split depends only on
the dataset, the two fractions and the seed, and is cached per process. Fractions are of the
whole dataset, rounded up: 1,797 rows with validation_split=0.2 give 360 validation rows.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from service.datasets.dataset import Dataset
from service.errors import DatasetError

STD_FLOOR = 1e-6  # a feature whose train std is below this is constant: divide by 1 instead
VAL_FIELD = "training.validation_split"
TEST_FIELD = "training.test_split"
SEED_FIELD = "training.split_seed"


@dataclass(frozen=True, eq=False)
class Splits:
    """Standardized arrays of one split; read-only, shared by every trial in the process.

    ``X_*`` are float32 C-contiguous ``(rows, n_features)``; ``y_*`` are int64. Every class
    appears in train and in validation. ``X = (raw - mean) / std`` with ``mean``/``std``
    (float32, per feature) from the train rows only. With ``test_split=0`` the test arrays
    have shape ``(0, n_features)`` and ``(0,)``. Convert with ``torch.tensor`` (a copy), not
    ``torch.from_numpy``, which would share the read-only memory.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_features: int
    n_classes: int
    mean: np.ndarray
    std: np.ndarray
    class_names: list[str]


_cache: weakref.WeakKeyDictionary[Dataset, dict[tuple[float, float, int], Splits]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def clear_split_cache() -> None:
    with _lock:
        _cache.clear()


def make_splits(ds: Dataset, *, validation_split: float, test_split: float, seed: int) -> Splits:
    """Split ``ds`` stratified by class, seeded, and standardize with train statistics.

    The same dataset object and parameters return the same (cached) Splits; the same data and
    parameters give identical arrays in any process. Raises ``DatasetError`` (field
    ``training.validation_split`` / ``training.test_split``) when a split would be smaller than
    the number of classes or would leave a class out of train or validation.
    """
    key = (float(validation_split), float(test_split), int(seed))
    with _lock:
        hit = _cache.get(ds, {}).get(key)
    if hit is not None:
        return hit
    splits = _make(ds, *key)
    with _lock:
        _cache.setdefault(ds, {})[key] = splits
    return splits


def _column_std(X: np.ndarray, mean: np.ndarray, rows: int = 512) -> np.ndarray:
    """``X.std(axis=0, dtype=np.float64)`` in blocks of ``rows`` rows.

    numpy's std makes a float64 copy of the whole of X minus its mean (44 MB for MNIST's 7,000
    training rows), which a fresh worker process maps and page-faults in: 80 ms of its first
    job's start, against about 10 ms in blocks (float32 results identical on MNIST's columns;
    in general they may differ in the last bit, from the summation order).
    """
    total = np.zeros(X.shape[1], dtype=np.float64)
    block = np.empty((min(rows, len(X)), X.shape[1]), dtype=np.float64)
    for start in range(0, len(X), rows):
        part = block[: len(X[start : start + rows])]
        np.subtract(X[start : start + rows], mean, out=part)
        np.square(part, out=part)
        total += part.sum(axis=0)
    return np.sqrt(total / len(X))


def _make(ds: Dataset, validation_split: float, test_split: float, seed: int) -> Splits:
    from sklearn.model_selection import train_test_split  # ~0.7 s import; workers only

    _check_params(validation_split, test_split, seed)
    n, k = ds.n_samples, ds.n_classes
    n_test = math.ceil(test_split * n) if test_split > 0 else 0
    n_val = math.ceil(validation_split * n)
    n_train = n - n_val - n_test
    counts = np.bincount(ds.y, minlength=k)
    _check_sizes(ds, counts, n_train, n_val, n_test, validation_split, test_split)

    index = np.arange(n)
    test_idx = np.zeros(0, dtype=np.int64)
    try:
        if n_test:
            index, test_idx = train_test_split(
                index, test_size=n_test, stratify=ds.y, random_state=seed
            )
        train_idx, val_idx = train_test_split(
            index, test_size=n_val, stratify=ds.y[index], random_state=seed
        )
    except ValueError as exc:  # _check_sizes should have caught it; keep sklearn's words
        raise DatasetError(f"cannot split the dataset: {exc}", field=VAL_FIELD) from None
    train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)

    for part, idx in (("training", train_idx), ("validation", val_idx)):
        missing = np.flatnonzero(np.bincount(ds.y[idx], minlength=k) == 0)
        if missing.size:
            c = int(missing[0])
            raise DatasetError(
                f"class {ds.class_names[c]!r} has {counts[c]} rows and gets none in the {part} "
                f"set with validation_split={validation_split} and test_split={test_split}; "
                "use more data for that class or a larger validation_split",
                field=VAL_FIELD,
            )

    X_train = ds.X[train_idx]
    mean = X_train.mean(axis=0, dtype=np.float64)
    std = _column_std(X_train, mean)
    std[std < STD_FLOOR] = 1.0
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)

    def standardize(X: np.ndarray) -> np.ndarray:
        # In place on the fresh copy fancy indexing made: each temporary of (X - mean) / std
        # would be another fresh array to page-fault in. With the blockwise std, make_splits
        # took 0.07 s of a new worker's first MNIST job instead of 0.17 s. Same results.
        X -= mean32
        X /= std32
        return _read_only(np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), ds.n_features))

    return Splits(
        X_train=standardize(X_train),
        y_train=_read_only(ds.y[train_idx]),
        X_val=standardize(ds.X[val_idx]),
        y_val=_read_only(ds.y[val_idx]),
        X_test=standardize(ds.X[test_idx]),
        y_test=_read_only(ds.y[test_idx]),
        n_features=ds.n_features,
        n_classes=k,
        mean=_read_only(mean32),
        std=_read_only(std32),
        class_names=list(ds.class_names),
    )


def _check_params(validation_split: float, test_split: float, seed: int) -> None:
    if not 0.0 < validation_split < 1.0:
        raise DatasetError(
            f"validation_split must be in (0, 1), got {validation_split}", field=VAL_FIELD
        )
    if not 0.0 <= test_split < 1.0:
        raise DatasetError(f"test_split must be in [0, 1), got {test_split}", field=TEST_FIELD)
    if validation_split + test_split >= 1.0:
        raise DatasetError(
            f"validation_split + test_split = {validation_split + test_split} leaves no "
            "training rows; their sum must be below 1",
            field=VAL_FIELD,
        )
    if not 0 <= seed < 2**32:
        raise DatasetError(f"the split seed must be in [0, 2**32), got {seed}", field=SEED_FIELD)


def _check_sizes(
    ds: Dataset,
    counts: np.ndarray,
    n_train: int,
    n_val: int,
    n_test: int,
    validation_split: float,
    test_split: float,
) -> None:
    n, k = ds.n_samples, ds.n_classes
    if n_val < k:
        raise DatasetError(
            f"validation_split={validation_split} of {n} rows gives {n_val} validation rows, "
            f"fewer than the {k} classes; raise validation_split or use more data",
            field=VAL_FIELD,
        )
    if n_test and n_test < k:
        raise DatasetError(
            f"test_split={test_split} of {n} rows gives {n_test} test rows, fewer than the "
            f"{k} classes; raise test_split, set it to 0, or use more data",
            field=TEST_FIELD,
        )
    if n_train < k:
        raise DatasetError(
            f"validation_split={validation_split} and test_split={test_split} leave {n_train} "
            f"training rows of {n}, fewer than the {k} classes",
            field=VAL_FIELD,
        )
    needed = 3 if n_test else 2  # one row each in train, validation (and test)
    rare = np.flatnonzero(counts < needed)
    if rare.size:
        c = int(rare[0])
        raise DatasetError(
            f"class {ds.class_names[c]!r} has {counts[c]} row(s); every class needs at least "
            f"{needed} so that it appears in the training and validation"
            f"{' (and test)' if n_test else ''} sets",
            field=VAL_FIELD,
        )


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
