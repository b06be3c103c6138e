from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.datasets import (
    CsvSpec,
    Dataset,
    DigitsSpec,
    MnistSpec,
    NpzSpec,
    SyntheticSpec,
    load_dataset,
    store_upload,
)
from service.errors import DatasetError, LimitExceededError, PayloadTooLargeError


def load(spec: Any, data_dir: Path, **kwargs: Any) -> Dataset:
    return load_dataset(
        spec, data_dir=data_dir, upload_dir=data_dir / "uploads", allow_local_paths=False, **kwargs
    )


def npz_bytes(X: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, X=X, y=y)
    return buf.getvalue()


def test_limit_error_is_not_a_dataset_error() -> None:
    assert not issubclass(LimitExceededError, DatasetError)
    assert issubclass(PayloadTooLargeError, LimitExceededError)


def test_csv_rows_and_features(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,c,label\n" + "1,2,3,0\n4,5,6,1\n" * 3)
    with pytest.raises(LimitExceededError, match="has 6 rows; the limit is 5"):
        load(CsvSpec(path="d.csv"), tmp_path, max_rows=5)
    with pytest.raises(LimitExceededError, match="has 3 features; the limit is 2"):
        load(CsvSpec(path="d.csv"), tmp_path, max_features=2)
    assert load(CsvSpec(path="d.csv"), tmp_path, max_rows=6, max_features=3).X.shape == (6, 3)


def test_csv_row_limit_counts_rows_not_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\n\n\n\n2,1\n\n")
    assert len(load(CsvSpec(path="d.csv"), tmp_path, max_rows=2).X) == 2


def test_npz_is_checked_from_the_header(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(npz_bytes(np.zeros((8, 2, 3)), np.arange(8) % 2))
    with pytest.raises(LimitExceededError, match="has 8 rows; the limit is 4"):
        load(NpzSpec(path="d.npz"), tmp_path, max_rows=4)
    with pytest.raises(LimitExceededError, match="has 6 features; the limit is 5"):
        load(NpzSpec(path="d.npz"), tmp_path, max_features=5)


def test_synthetic_is_checked_before_generating(tmp_path: Path) -> None:
    with pytest.raises(LimitExceededError, match="has 1,000 rows; the limit is 500"):
        load(SyntheticSpec(), tmp_path, max_rows=500)
    with pytest.raises(LimitExceededError, match="has 20 features; the limit is 10"):
        load(SyntheticSpec(), tmp_path, max_features=10)


def test_digits(tmp_path: Path) -> None:
    with pytest.raises(LimitExceededError, match="has 64 features; the limit is 10"):
        load(DigitsSpec(), tmp_path, max_features=10)


def test_mnist_limit_counts_after_the_row_limit(
    tmp_path: Path, write_idx: Callable[..., Any]
) -> None:
    write_idx(tmp_path / "mnist", "train", n=60)
    with pytest.raises(LimitExceededError, match="has 60 rows; the limit is 50"):
        load(MnistSpec(), tmp_path, max_rows=50)
    assert len(load(MnistSpec(limit=40), tmp_path, max_rows=50).X) == 40
    with pytest.raises(LimitExceededError, match="has 784 features; the limit is 100"):
        load(MnistSpec(limit=40), tmp_path, max_features=100)


def test_uploads_answer_413(tmp_path: Path) -> None:
    content = b"a,b,label\n1,2,0\n3,4,1\n5,6,0\n"
    with pytest.raises(PayloadTooLargeError, match="has 3 rows; the limit is 2"):
        store_upload(content, "d.csv", tmp_path, max_rows=2, max_features=10)
    with pytest.raises(PayloadTooLargeError, match="has 2 features; the limit is 1"):
        store_upload(content, "d.csv", tmp_path, max_rows=10, max_features=1)
    with pytest.raises(PayloadTooLargeError, match=f"is {len(content)} bytes; the limit is 10"):
        store_upload(content, "d.csv", tmp_path, max_bytes=10)
    assert not tmp_path.joinpath("d.csv").exists() and list(tmp_path.iterdir()) == []
