"""The in-memory dataset every loader returns, and the checks shared by the file formats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.errors import DatasetError, LimitExceededError

MAX_CLASSES = 1_000  # more distinct labels than this is a regression target or an id column


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory.

    Invariants, checked on construction: ``X`` is float32, 2-D, C-contiguous and finite;
    ``y`` is int64, 1-D, ``len(y) == len(X)``, values in ``0..n_classes-1``;
    ``len(class_names) == n_classes >= 2``. Both arrays are read-only views, because a cached
    Dataset is shared by every trial in the process. ``eq=False`` makes equality and hashing
    by identity, so a Dataset can key caches (see ``make_splits``).
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int
    class_names: list[str]

    def __post_init__(self) -> None:
        X, y = self.X, self.y
        if X.dtype != np.float32 or X.ndim != 2 or not X.flags.c_contiguous:
            raise DatasetError(
                f"X must be a C-contiguous 2-D float32 array, got {X.dtype} {X.shape}",
                field=self.name,
            )
        if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(X):
            raise DatasetError(
                f"y must be 1-D int64 with one label per row of X ({len(X)}), "
                f"got {y.dtype} {y.shape}",
                field=self.name,
            )
        if self.n_classes < 2 or len(self.class_names) != self.n_classes:
            raise DatasetError(
                f"need n_classes >= 2 and one name per class, got n_classes={self.n_classes} "
                f"and {len(self.class_names)} names",
                field=self.name,
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise DatasetError(f"labels must lie in 0..{self.n_classes - 1}", field=self.name)
        if not np.isfinite(X).all():
            raise DatasetError("X contains NaN or inf", field=self.name)
        object.__setattr__(self, "X", _read_only(X))
        object.__setattr__(self, "y", _read_only(y))

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def check_limits(
    rows: int,
    features: int,
    *,
    max_rows: int,
    max_features: int,
    field: str,
    error: type[LimitExceededError] = LimitExceededError,
) -> None:
    """Raise ``error`` naming the actual and the allowed number when a limit is exceeded."""
    if rows > max_rows:
        raise error(
            f"the dataset has {rows:,} rows; the limit is {max_rows:,} (max_dataset_rows)",
            field=field,
        )
    if features > max_features:
        raise error(
            f"the dataset has {features:,} features; the limit is {max_features:,} "
            "(max_dataset_features)",
            field=field,
        )


class LabelProblem(Exception):
    """A label that cannot be a class; ``index`` is its position in the array passed in."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map labels to ``0..k-1`` in sorted order; return (codes int64, class names).

    Integers (and integral floats, and strings that all parse as such) sort numerically and
    are named by their value; other strings sort as strings. Raises ``LabelProblem``.
    """
    kind = labels.dtype.kind
    if kind == "b":
        labels = labels.astype(np.int64)
        kind = "i"
    if kind in "US":
        labels = np.char.strip(labels.astype(str))
        empty = np.flatnonzero(labels == "")
        if empty.size:
            raise LabelProblem(int(empty[0]), "empty label")
        numeric = _numeric_or_none(labels)
        if numeric is None:
            uniq, codes = np.unique(labels, return_inverse=True)
            return codes.astype(np.int64).ravel(), [str(u) for u in uniq]
        labels = numeric
        kind = labels.dtype.kind
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels))
        if bad.size:
            raise LabelProblem(int(bad[0]), f"label is {labels[bad[0]]}")
        frac = np.flatnonzero(labels != np.round(labels))
        if frac.size:
            raise LabelProblem(
                int(frac[0]),
                f"label {labels[frac[0]]!r} is not a whole number: class labels must be "
                "integers or strings (is this a regression target?)",
            )
        labels = labels.astype(np.int64)
        kind = "i"
    if kind not in "iu":
        raise LabelProblem(-1, f"labels must be integers or strings, not dtype {labels.dtype}")
    uniq, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64).ravel(), [str(int(u)) for u in uniq]


def _numeric_or_none(labels: np.ndarray) -> np.ndarray | None:
    for dtype in (np.int64, np.float64):
        try:
            return labels.astype(dtype)
        except (ValueError, OverflowError):
            continue
    return None


def check_classes(class_names: list[str], *, field: str) -> None:
    k = len(class_names)
    if k < 2:
        only = f" (every label is {class_names[0]!r})" if k == 1 else ""
        raise DatasetError(f"need at least two classes, found {k}{only}", field=field)
    if k > MAX_CLASSES:
        raise DatasetError(
            f"{k:,} distinct labels; at most {MAX_CLASSES:,} classes are supported "
            "(is the label column a regression target or an id?)",
            field=field,
        )


def first_nonfinite(X: np.ndarray) -> tuple[int, int] | None:
    """(count of NaN/inf entries, flat index of the first), or None when all are finite."""
    bad = ~np.isfinite(X)
    if not bad.any():
        return None
    flat = bad.ravel()
    return int(flat.sum()), int(np.argmax(flat))
