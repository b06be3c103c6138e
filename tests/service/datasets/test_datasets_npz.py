from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.datasets import Dataset, NpzSpec, load_dataset
from service.errors import DatasetError


def save(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # allow_pickle defaults to True: object arrays get pickled
    (tmp_path / name).write_bytes(buf.getvalue())


def load_npz(tmp_path: Path, name: str = "data.npz") -> Dataset:
    return load_dataset(
        NpzSpec(path=name),
        data_dir=tmp_path,
        upload_dir=tmp_path / "uploads",
        allow_local_paths=False,
    )


def npz_error(tmp_path: Path) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_npz(tmp_path)
    return info.value


def test_two_d(tmp_path: Path) -> None:
    X = np.arange(12, dtype=np.float64).reshape(6, 2)
    save(tmp_path, X=X, y=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_npz(tmp_path)
    np.testing.assert_array_equal(ds.X, X.astype(np.float32))
    assert ds.y.tolist() == [0, 1, 2, 0, 1, 2] and ds.class_names == ["0", "1", "2"]
    assert ds.name == "npz:data.npz"


def test_images_are_flattened_and_string_labels_sorted(tmp_path: Path) -> None:
    X = np.random.default_rng(0).integers(0, 255, size=(4, 3, 5), dtype=np.uint8)
    save(tmp_path, X=X, y=np.array(["dog", "cat", "dog", "ant"]))
    ds = load_npz(tmp_path)
    assert ds.X.shape == (4, 15) and ds.X.flags.c_contiguous
    np.testing.assert_array_equal(ds.X, X.reshape(4, 15).astype(np.float32))
    assert ds.class_names == ["ant", "cat", "dog"] and ds.y.tolist() == [2, 1, 2, 0]


def test_bool_features_and_column_vector_labels(tmp_path: Path) -> None:
    save(tmp_path, X=np.array([[True, False], [False, True]]), y=np.array([[3], [7]]))
    ds = load_npz(tmp_path)
    assert ds.X.tolist() == [[1.0, 0.0], [0.0, 1.0]] and ds.class_names == ["3", "7"]


class _Payload:
    """Unpickling this would create ``marker``: proof that nothing was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("key", ["X", "y"])
def test_object_arrays_are_refused_without_unpickling(tmp_path: Path, key: str) -> None:
    marker = tmp_path / "unpickled"
    arrays: dict[str, Any] = {"X": np.zeros((2, 2)), "y": np.array([0, 1])}
    arrays[key] = np.array([_Payload(marker), _Payload(marker)], dtype=object)
    save(tmp_path, **arrays)
    err = npz_error(tmp_path)
    assert "object" in err.message and "pickle" in err.message
    assert err.field == f"data.npz:{key}"
    assert not marker.exists()


def test_missing_array_lists_what_is_there(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((2, 2)), labels=np.array([0, 1]))
    err = npz_error(tmp_path)
    assert "lacks array(s) y" in err.message and "arrays seen: X, labels" in err.message


def test_length_mismatch(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((10, 2)), y=np.arange(9) % 2)
    assert "X has 10 rows but y has 9 labels" in npz_error(tmp_path).message


def test_one_d_x_is_not_2d_able(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros(10), y=np.arange(10) % 2)
    err = npz_error(tmp_path)
    assert "shape (10,)" in err.message and err.field == "data.npz:X"


def test_two_d_labels(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((4, 2)), y=np.zeros((4, 2)))
    assert "y in data.npz must be 1-D" in npz_error(tmp_path).message


@pytest.mark.parametrize("X", [np.array([["a", "b"], ["c", "d"]]), np.ones((2, 2), complex)])
def test_non_numeric_features(tmp_path: Path, X: np.ndarray) -> None:
    save(tmp_path, X=X, y=np.array([0, 1]))
    assert "must be numeric" in npz_error(tmp_path).message


def test_nan_in_x_says_where(tmp_path: Path) -> None:
    X = np.zeros((4, 2, 3))
    X[2, 1, 0] = np.nan
    X[3, 0, 0] = np.inf
    save(tmp_path, X=X, y=np.array([0, 1, 0, 1]))
    err = npz_error(tmp_path)
    assert "2 NaN/inf value(s)" in err.message and "X[2, 1, 0] = nan" in err.message


def test_non_integer_float_labels(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((3, 2)), y=np.array([0.0, 1.5, 1.0]))
    err = npz_error(tmp_path)
    assert "not a whole number" in err.message and "y[1]" in err.message


def test_single_class(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((3, 2)), y=np.array([4, 4, 4]))
    assert "at least two classes" in npz_error(tmp_path).message


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"X,y\n1,2\n")
    assert "not a valid .npz" in npz_error(tmp_path).message


def test_truncated_npz(tmp_path: Path) -> None:
    save(tmp_path, X=np.zeros((50, 2)), y=np.arange(50) % 2)
    f = tmp_path / "data.npz"
    f.write_bytes(f.read_bytes()[:300])
    assert isinstance(npz_error(tmp_path), DatasetError)


def test_empty_npz_file(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"")
    assert "is empty" in npz_error(tmp_path).message
