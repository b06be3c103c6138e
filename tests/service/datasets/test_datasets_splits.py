from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.datasets import (
    Dataset,
    DigitsSpec,
    Splits,
    clear_dataset_cache,
    load_dataset,
    make_splits,
)
from service.errors import DatasetError


@pytest.fixture
def digits(tmp_path: Path) -> Dataset:
    return load_dataset(
        DigitsSpec(), data_dir=tmp_path, upload_dir=tmp_path, allow_local_paths=False
    )


def make_dataset(counts: list[int], n_features: int = 3, seed: int = 0) -> Dataset:
    """Feature 0 is the row id, so a split row can be traced back to its source row."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    y = y[rng.permutation(len(y))].astype(np.int64)
    X = rng.normal(size=(len(y), n_features)).astype(np.float32) * 5 + 2
    X[:, 0] = np.arange(len(y))
    X = np.ascontiguousarray(X)
    return Dataset(
        name="hand-made",
        X=X,
        y=y,
        n_classes=len(counts),
        class_names=[f"c{i}" for i in range(len(counts))],
    )


def row_ids(splits: Splits, X: np.ndarray) -> np.ndarray:
    return np.rint(X[:, 0] * splits.std[0] + splits.mean[0]).astype(np.int64)


def test_sizes_types_and_every_class_everywhere(digits: Dataset) -> None:
    s = make_splits(digits, validation_split=0.2, test_split=0.1, seed=0)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (1797 - 360 - 180, 360, 180)
    assert s.n_features == 64 and s.n_classes == 10 and s.class_names == digits.class_names
    for X, y in ((s.X_train, s.y_train), (s.X_val, s.y_val), (s.X_test, s.y_test)):
        assert X.dtype == np.float32 and X.flags.c_contiguous and X.shape[1] == 64
        assert y.dtype == np.int64 and len(X) == len(y)
        assert not X.flags.writeable and not y.flags.writeable
        assert set(np.unique(y)) == set(range(10))


def test_stratified_proportions(digits: Dataset) -> None:
    s = make_splits(digits, validation_split=0.2, test_split=0.1, seed=3)
    expected = np.bincount(digits.y) * 360 / 1797
    assert np.all(np.abs(np.bincount(s.y_val) - expected) <= 1)


def test_same_seed_same_split_different_seed_other_split(digits: Dataset) -> None:
    a = make_splits(digits, validation_split=0.2, test_split=0.1, seed=0)
    clear_dataset_cache()  # also forgets cached splits
    b = make_splits(digits, validation_split=0.2, test_split=0.1, seed=0)
    assert a is not b
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = make_splits(digits, validation_split=0.2, test_split=0.1, seed=1)
    assert not np.array_equal(a.X_val, c.X_val)


def test_identical_split_for_an_identical_copy_of_the_data() -> None:
    a = make_splits(make_dataset([30, 40, 50]), validation_split=0.25, test_split=0.0, seed=7)
    b = make_splits(make_dataset([30, 40, 50]), validation_split=0.25, test_split=0.0, seed=7)
    np.testing.assert_array_equal(a.X_val, b.X_val)


def test_standardization_uses_train_statistics_only() -> None:
    ds = make_dataset([40, 60, 50], n_features=4)
    s = make_splits(ds, validation_split=0.2, test_split=0.2, seed=0)
    train_ids, val_ids, test_ids = (row_ids(s, X) for X in (s.X_train, s.X_val, s.X_test))
    assert sorted(np.concatenate([train_ids, val_ids, test_ids]).tolist()) == list(range(150))
    raw_train = ds.X[train_ids].astype(np.float64)
    np.testing.assert_allclose(s.mean, raw_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(s.std, raw_train.std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(s.X_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(s.X_train.std(axis=0), 1, atol=1e-4)
    for X, ids in ((s.X_val, val_ids), (s.X_test, test_ids)):
        np.testing.assert_allclose(X, (ds.X[ids] - s.mean) / s.std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s.y_val if X is s.X_val else s.y_test, ds.y[ids])


def test_constant_features_divide_by_one(digits: Dataset) -> None:
    s = make_splits(digits, validation_split=0.2, test_split=0.0, seed=0)
    constant = digits.X.std(axis=0) == 0  # digits has all-zero pixel columns
    assert constant.any()
    assert np.all(s.std[constant] == 1.0)
    assert np.all(s.X_train[:, constant] == 0.0)


def test_zero_test_split_gives_empty_arrays(digits: Dataset) -> None:
    s = make_splits(digits, validation_split=0.2, test_split=0.0, seed=0)
    assert s.X_test.shape == (0, 64) and s.X_test.dtype == np.float32
    assert s.y_test.shape == (0,) and s.y_test.dtype == np.int64
    assert len(s.y_train) + len(s.y_val) == 1797


def test_splits_are_cached_per_dataset_and_parameters(digits: Dataset) -> None:
    a = make_splits(digits, validation_split=0.2, test_split=0.1, seed=0)
    assert make_splits(digits, validation_split=0.2, test_split=0.1, seed=0) is a
    assert make_splits(digits, validation_split=0.2, test_split=0.1, seed=1) is not a
    assert make_splits(digits, validation_split=0.3, test_split=0.1, seed=0) is not a


def test_rare_class_left_out_of_validation_is_an_error() -> None:
    ds = make_dataset([998, 2])  # 50 validation rows: the 2-row class gets none
    with pytest.raises(DatasetError) as info:
        make_splits(ds, validation_split=0.05, test_split=0.0, seed=0)
    assert info.value.field == "training.validation_split"
    assert "class 'c1' has 2 rows and gets none in the validation set" in info.value.message


def test_class_with_one_row_is_an_error() -> None:
    with pytest.raises(DatasetError, match="class 'c2' has 1 row"):
        make_splits(make_dataset([20, 20, 1]), validation_split=0.2, test_split=0.0, seed=0)
    with pytest.raises(DatasetError, match=r"at least 3 .*\(and test\)"):
        make_splits(make_dataset([20, 20, 2]), validation_split=0.2, test_split=0.2, seed=0)


def test_class_with_no_rows_is_an_error() -> None:
    ds = make_dataset([20, 20, 0])
    with pytest.raises(DatasetError, match="class 'c2' has 0 row"):
        make_splits(ds, validation_split=0.2, test_split=0.0, seed=0)


def test_too_small_splits() -> None:
    ds = make_dataset([4, 3, 3])
    with pytest.raises(
        DatasetError, match="gives 1 validation rows, fewer than the 3 classes"
    ) as v:
        make_splits(ds, validation_split=0.1, test_split=0.0, seed=0)
    assert v.value.field == "training.validation_split"
    with pytest.raises(DatasetError, match="gives 1 test rows") as t:
        make_splits(ds, validation_split=0.3, test_split=0.1, seed=0)
    assert t.value.field == "training.test_split"
    with pytest.raises(DatasetError, match="leave 2 training rows"):
        make_splits(ds, validation_split=0.4, test_split=0.4, seed=0)


@pytest.mark.parametrize(
    ("val", "test", "field"),
    [
        (0.0, 0.1, "training.validation_split"),
        (1.0, 0.0, "training.validation_split"),
        (0.2, -0.1, "training.test_split"),
        (0.5, 0.5, "training.validation_split"),
    ],
)
def test_invalid_fractions(digits: Dataset, val: float, test: float, field: str) -> None:
    with pytest.raises(DatasetError) as info:
        make_splits(digits, validation_split=val, test_split=test, seed=0)
    assert info.value.field == field


def test_invalid_seed(digits: Dataset) -> None:
    with pytest.raises(DatasetError, match="seed"):
        make_splits(digits, validation_split=0.2, test_split=0.1, seed=-1)


@pytest.mark.parametrize("n_rows", [1, 511, 512, 513, 7000])
def test_blockwise_column_std_equals_numpys(n_rows: int) -> None:
    from service.datasets.splits import _column_std

    X = np.random.default_rng(n_rows).normal(3.0, 2.0, size=(n_rows, 37)).astype(np.float32)
    mean = X.mean(axis=0, dtype=np.float64)
    expected = X.std(axis=0, dtype=np.float64)
    np.testing.assert_allclose(_column_std(X, mean), expected, rtol=1e-12, atol=1e-12)
    assert (_column_std(X, mean).astype(np.float32) == expected.astype(np.float32)).mean() > 0.99
