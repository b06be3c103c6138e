from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.datasets import CsvSpec, Dataset, load_dataset
from service.errors import DatasetError


def load_csv(tmp_path: Path, text: str | bytes, *, label_column: str = "label") -> Dataset:
    data = text.encode() if isinstance(text, str) else text
    (tmp_path / "data.csv").write_bytes(data)
    return load_dataset(
        CsvSpec(path="data.csv", label_column=label_column),
        data_dir=tmp_path,
        upload_dir=tmp_path / "uploads",
        allow_local_paths=False,
    )


def csv_error(tmp_path: Path, text: str | bytes, **kwargs: str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_csv(tmp_path, text, **kwargs)
    return info.value


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    ds = load_csv(tmp_path, "a,b,label\n1,2,10\n3,4,2\n5,6,1\n7,8,2\n")
    assert ds.class_names == ["1", "2", "10"]
    assert ds.y.tolist() == [2, 1, 0, 1]
    np.testing.assert_array_equal(ds.X, np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32))
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64 and ds.name == "csv:data.csv"


def test_string_labels_sort_and_label_column_anywhere(tmp_path: Path) -> None:
    ds = load_csv(tmp_path, "kind,x,y\ncat,1,2\nant,3,4\nbee,5,6\ncat,7,8\n", label_column="kind")
    assert ds.class_names == ["ant", "bee", "cat"]
    assert ds.y.tolist() == [2, 0, 1, 2]
    assert ds.X.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]


def test_quotes_blank_lines_bom_and_crlf(tmp_path: Path) -> None:
    text = '\ufeff"a","b",label\r\n"1.5",2,"x y"\r\n\r\n3,-4e2, z \r\n'
    ds = load_csv(tmp_path, text)
    assert ds.X.tolist() == [[1.5, 2.0], [3.0, -400.0]]
    assert ds.class_names == ["x y", "z"]


def test_integral_float_labels_are_classes(tmp_path: Path) -> None:
    ds = load_csv(tmp_path, "a,label\n1,0.0\n2,1.0\n3,1\n")
    assert ds.class_names == ["0", "1"] and ds.y.tolist() == [0, 1, 1]


def test_many_rows_match_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=3000)
    lines = ["f0,f1,f2,f3,f4,label"] + [
        ",".join(f"{v!r}" for v in row.tolist()) + f",{c}" for row, c in zip(X, y, strict=True)
    ]
    ds = load_csv(tmp_path, "\n".join(lines) + "\n")
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)


def test_missing_label_column_lists_the_columns(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,b,target\n1,2,0\n3,4,1\n")
    assert err.field == "dataset.label_column"
    assert "'label' not found" in err.message and "'a', 'b', 'target'" in err.message


def test_non_numeric_cell_names_file_line_and_column(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,b,label\n1,2,0\n\n3,abc,1\n")
    assert err.field == "data.csv:line 4"
    assert "non-numeric value 'abc'" in err.message
    assert "column 'b'" in err.message and "line 4" in err.message and "data.csv" in err.message


def test_empty_cell(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,b,label\n1,2,0\n3,,1\n")
    assert err.field == "data.csv:line 3" and "empty cell in column 'b'" in err.message


def test_nan_and_inf_count_and_first_place(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,b,label\n1,2,0\n\nnan,2,1\n3,inf,0\n-inf,1,1\n")
    assert "3 NaN/inf value(s)" in err.message
    assert "nan" in err.message and "column 'a'" in err.message and "line 4" in err.message
    assert err.field == "data.csv:line 4"


def test_value_too_large_for_float32(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,label\n1,0\n1e39,1\n")
    assert "too large for float32" in err.message and err.field == "data.csv:line 3"


@pytest.mark.parametrize(
    ("text", "line", "fields"),
    [
        ("a,b,label\n1,2,0\n3,4,1,9\n", 3, 4),
        ("a,b,label\n1,2,0\n3,4\n", 3, 2),
        ("a,b,label\n1,2,0,5\n3,4,1,6\n", 2, 4),  # every row too wide: still line 2
    ],
)
def test_ragged_rows(tmp_path: Path, text: str, line: int, fields: int) -> None:
    err = csv_error(tmp_path, text)
    assert err.field == f"data.csv:line {line}"
    assert f"has {fields} fields; the header has 3" in err.message


@pytest.mark.parametrize("text", ["", "   \n\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert "is empty" in csv_error(tmp_path, text).message


def test_header_only(tmp_path: Path) -> None:
    assert "no data rows" in csv_error(tmp_path, "a,b,label\n").message


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,label\n1,x\n2,x\n")
    assert "at least two classes" in err.message and "'x'" in err.message


def test_non_integer_numeric_labels(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,label\n1,0\n2,0.5\n3,1\n")
    assert "not a whole number" in err.message and err.field == "data.csv:line 3"


def test_empty_label(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,label\n1,0\n2,1\n3, \n")
    assert "empty label" in err.message and err.field == "data.csv:line 4"


def test_nan_label(tmp_path: Path) -> None:
    err = csv_error(tmp_path, "a,label\n1,0\n2,nan\n")
    assert "label is nan" in err.message and err.field == "data.csv:line 3"


def test_duplicate_columns(tmp_path: Path) -> None:
    assert "duplicate column" in csv_error(tmp_path, "a,a,label\n1,2,0\n").message


def test_only_a_label_column(tmp_path: Path) -> None:
    assert "no feature columns" in csv_error(tmp_path, "label\n0\n1\n").message


def test_not_utf8(tmp_path: Path) -> None:
    err = csv_error(tmp_path, b"a,label\n1,0\n2,\xff\xfe\n")
    assert "not UTF-8" in err.message and err.field == "data.csv:line 3"


def test_rows_numpy_refuses_still_load_with_exact_lines(tmp_path: Path) -> None:
    # A whitespace-only line sends the file down the csv-module path; lines stay exact.
    ds = load_csv(tmp_path, "a,label\n1,0\n   \n2,1\n")
    assert ds.X.ravel().tolist() == [1.0, 2.0] and ds.y.tolist() == [0, 1]
    err = csv_error(tmp_path, "a,label\n1,0\n   \n2,1\nnan,0\n")
    assert err.field == "data.csv:line 5"
