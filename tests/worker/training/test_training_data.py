from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service.errors import DatasetError
from worker.training import TensorSplits, configure_cpu_threads, resolve_device, to_tensors


def _arrays(n_features: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = []
    for n in (10, 5, 3):
        out += [rng.normal(size=(n, n_features)), rng.integers(0, 3, size=n).astype(np.int32)]
    out[1][0] = 2  # make sure the highest class appears
    return out


def _to(a: list[np.ndarray], **kwargs: Any) -> TensorSplits:
    return to_tensors(a[0], a[1], a[2], a[3], a[4], a[5], **kwargs)


def test_to_tensors_casts_and_infers_classes() -> None:
    splits = _to(_arrays(), device="cpu")
    assert splits.X_train.dtype == torch.float32 and splits.y_val.dtype == torch.int64
    assert splits.X_test.shape == (3, 4) and splits.n_features == 4
    assert splits.n_classes == 3 and splits.device == torch.device("cpu")
    assert splits.to("cpu") is splits
    assert _to(_arrays(), n_classes=7).n_classes == 7


def test_derived_tensors_are_made_once_per_splits_and_key() -> None:
    splits = _to(_arrays())
    calls: list[str] = []

    def make(tag: str) -> torch.Tensor:
        calls.append(tag)
        return splits.X_train * 2

    first = splits.derived("doubled", lambda: make("a"))
    assert splits.derived("doubled", lambda: make("b")) is first
    assert splits.derived(("doubled", 2), lambda: make("c")) is not first
    assert calls == ["a", "c"]
    assert _to(_arrays()).derived("doubled", lambda: make("d")) is not first  # other splits
    assert calls == ["a", "c", "d"]
    assert "_derived" not in repr(splits)


def test_empty_test_split_is_allowed() -> None:
    arrays = _arrays()
    arrays[4], arrays[5] = arrays[4][:0], arrays[5][:0]
    assert _to(arrays).X_test.shape == (0, 4)


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (2, np.full((5, 4), np.nan), "X_val"),
        (0, np.full((10, 4), np.inf), "X_train"),
        (5, np.array([0.5, 1.0, 2.0]), "y_test"),
        (2, np.zeros((5, 3)), "X_val"),
        (3, np.zeros(4, dtype=np.int64), "y_val"),
        (3, np.zeros(0, dtype=np.int64), "y_val"),
        (1, np.full(10, -1), "y"),
        (4, np.array([["a"] * 4] * 3), "X_test"),
    ],
)
def test_bad_data_is_a_dataset_error(index: int, value: np.ndarray, field: str) -> None:
    arrays = _arrays()
    arrays[index] = value
    if field == "y_val" and value.shape == (0,):
        arrays[2] = arrays[2][:0]
        field = "X_val"  # an empty validation split
    with pytest.raises(DatasetError) as excinfo:
        _to(arrays)
    assert excinfo.value.field == field
    assert isinstance(excinfo.value, ValueError)


def test_labels_beyond_n_classes() -> None:
    with pytest.raises(DatasetError, match="labels"):
        _to(_arrays(), n_classes=2)


def test_splits_must_share_a_device() -> None:
    splits = _to(_arrays())
    with pytest.raises(DatasetError, match="device"):
        TensorSplits(
            splits.X_train,
            splits.y_train,
            splits.X_val.to("meta"),
            splits.y_val,
            splits.X_test,
            splits.y_test,
            n_classes=3,
        )


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'cuda' requested but .* no usable CUDA"):
        resolve_device("cuda")


def test_configure_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        cores = configure_cpu_threads(1)
        assert cores >= 1 and torch.get_num_threads() == cores
        assert configure_cpu_threads(cores * 4) == 1  # never below one thread
        assert torch.get_num_threads() == 1
        if cores >= 2:
            assert configure_cpu_threads(2) == cores // 2
        with pytest.raises(ValueError, match="n_processes"):
            configure_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
