"""``.npz`` datasets: array ``X`` (rows first, flattened to 2-D) and array ``y`` (1-D labels).

Never unpickles: each member's ``.npy`` header is read first, so object arrays are refused by
name and oversized arrays by their shape before any data is read; the load itself then runs
with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

from service.datasets.dataset import (
    Dataset,
    LabelProblem,
    check_classes,
    check_limits,
    encode_labels,
    first_nonfinite,
)
from service.errors import DatasetError, LimitExceededError


def parse_npz(
    content: bytes,
    *,
    name: str,
    source: str,
    max_rows: int,
    max_features: int,
    limit_error: type[LimitExceededError] = LimitExceededError,
) -> Dataset:
    """Parse and validate a whole ``.npz`` file; ``source`` names it in messages and fields."""
    if not content:
        raise DatasetError(f"{source} is empty", field=source)
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise DatasetError(
            f"{source} is not a valid .npz file (expected a zip of .npy arrays, as numpy.savez "
            "writes)",
            field=source,
        ) from None
    with archive:
        members = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
        missing = [k for k in ("X", "y") if k not in members]
        if missing:
            seen = ", ".join(sorted(members)) or "none"
            raise DatasetError(
                f"{source} lacks array(s) {', '.join(missing)}; arrays seen: {seen}", field=source
            )
        shapes = {key: _check_header(archive, members[key], key, source) for key in ("X", "y")}
    x_shape = shapes["X"]
    if len(x_shape) >= 2:
        check_limits(
            x_shape[0],
            math.prod(x_shape[1:]),
            max_rows=max_rows,
            max_features=max_features,
            field=source,
            error=limit_error,
        )
    X_raw = _load_array(content, "X", source)
    y_raw = _load_array(content, "y", source)
    X = _features(X_raw, source)
    y_flat = _labels(y_raw, len(X), source)
    check_limits(
        X.shape[0],
        X.shape[1],
        max_rows=max_rows,
        max_features=max_features,
        field=source,
        error=limit_error,
    )
    try:
        y, class_names = encode_labels(y_flat)
    except LabelProblem as p:
        at = f" at y[{p.index}]" if p.index >= 0 else ""
        raise DatasetError(f"{p.reason}{at} in {source}", field=f"{source}:y") from None
    check_classes(class_names, field=f"{source}:y")
    return Dataset(name=name, X=X, y=y, n_classes=len(class_names), class_names=class_names)


def _check_header(archive: zipfile.ZipFile, member: str, key: str, source: str) -> tuple[int, ...]:
    """Read only the .npy header: refuse object dtypes, return the shape."""
    where = f"{source}:{key}"
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return ()  # newer header: np.load below still refuses pickles
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"array {key!r} in {source} is corrupt: {exc}", field=where) from None
    if dtype.hasobject:
        raise DatasetError(
            f"array {key!r} in {source} has an object dtype ({dtype}); object arrays need "
            "pickle and are refused: save plain numeric (X) and numeric or string (y) arrays",
            field=where,
        )
    return tuple(int(n) for n in shape)


def _load_array(content: bytes, key: str, source: str) -> np.ndarray:
    where = f"{source}:{key}"
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            return np.asarray(npz[key])
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DatasetError(
                f"array {key!r} in {source} is an object array; pickled data is refused",
                field=where,
            ) from None
        raise DatasetError(
            f"array {key!r} in {source} cannot be read: {exc}", field=where
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"array {key!r} in {source} is corrupt: {exc}", field=where) from None


def _features(X: np.ndarray, source: str) -> np.ndarray:
    where = f"{source}:X"
    if X.dtype.kind not in "biuf":
        raise DatasetError(
            f"X in {source} must be numeric (bool, int or float), got dtype {X.dtype}", field=where
        )
    if X.ndim < 2:
        raise DatasetError(
            f"X in {source} has shape {X.shape}; it needs a row axis and at least one feature "
            "axis (e.g. (rows, features) or (rows, height, width))",
            field=where,
        )
    if X.shape[0] == 0:
        raise DatasetError(f"X in {source} has no rows", field=where)
    flat = X.reshape(X.shape[0], -1)
    if flat.shape[1] == 0:
        raise DatasetError(f"X in {source} has shape {X.shape}: no features", field=where)
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        out = np.ascontiguousarray(flat, dtype=np.float32)
    found = first_nonfinite(out)
    if found is not None:
        count, flat_index = found
        index = np.unravel_index(flat_index, X.shape)
        value = float(X[index])
        what = repr(value) if not np.isfinite(value) else f"{value!r} (too large for float32)"
        raise DatasetError(
            f"{count} NaN/inf value(s) in X of {source}; the first is "
            f"X[{', '.join(str(int(i)) for i in index)}] = {what}",
            field=where,
        )
    return out


def _labels(y: np.ndarray, n_rows: int, source: str) -> np.ndarray:
    where = f"{source}:y"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # a column vector is unambiguous
    if y.ndim != 1:
        raise DatasetError(f"y in {source} must be 1-D, got shape {y.shape}", field=where)
    if len(y) != n_rows:
        raise DatasetError(
            f"X has {n_rows} rows but y has {len(y)} labels in {source}; they must match",
            field=where,
        )
    return y
