from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from service.datasets import (
    CsvSpec,
    DatasetInfo,
    UploadSpec,
    get_upload_info,
    list_uploads,
    load_dataset,
    store_upload,
)
from service.errors import ConflictError, DatasetError, NotFoundError

CSV = b"a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n"


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def load_upload(upload_id: str, upload_dir: Path) -> object:
    return load_dataset(
        UploadSpec(id=upload_id),
        data_dir=upload_dir / "no-data",
        upload_dir=upload_dir,
        allow_local_paths=False,
    )


def test_csv_round_trip(tmp_path: Path) -> None:
    info = store_upload(CSV, "pets.csv", tmp_path)
    assert info.id == hashlib.sha256(CSV).hexdigest()[:32]
    assert (info.format, info.filename, info.rows, info.features) == ("csv", "pets.csv", 3, 2)
    assert (info.n_classes, info.class_names, info.size_bytes) == (2, ["cat", "dog"], len(CSV))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{info.id}.csv", f"{info.id}.json"]
    assert (tmp_path / f"{info.id}.csv").read_bytes() == CSV

    ds = load_dataset(
        UploadSpec(id=info.id), data_dir=tmp_path, upload_dir=tmp_path, allow_local_paths=False
    )
    assert ds.name == f"upload:{info.id}"
    assert ds.X.tolist() == [[1, 2], [3, 4], [5, 6]] and ds.y.tolist() == [0, 1, 0]
    assert get_upload_info(info.id, tmp_path) == info


def test_metadata_file(tmp_path: Path) -> None:
    info = store_upload(CSV, "pets.csv", tmp_path)
    meta = json.loads((tmp_path / f"{info.id}.json").read_text())
    assert set(meta) >= {
        "id",
        "format",
        "filename",
        "rows",
        "features",
        "n_classes",
        "class_names",
        "label_column",
        "size_bytes",
        "created_at",
    }
    assert meta["label_column"] == "label" and meta["created_at"].endswith("Z")


def test_npz_round_trip(tmp_path: Path) -> None:
    content = npz_bytes(X=np.ones((4, 2, 2)), y=np.array([1, 2, 1, 2]))
    info = store_upload(content, "images.NPZ", tmp_path)
    assert (info.format, info.rows, info.features, info.label_column) == ("npz", 4, 4, None)
    ds = load_dataset(
        UploadSpec(id=info.id), data_dir=tmp_path, upload_dir=tmp_path, allow_local_paths=False
    )
    assert ds.X.shape == (4, 4) and ds.class_names == ["1", "2"]


def test_custom_label_column_is_stored_and_used(tmp_path: Path) -> None:
    content = b"label,x,target\n9,1,a\n9,2,b\n"
    info = store_upload(content, "t.csv", tmp_path, label_column="target")
    assert info.label_column == "target" and info.features == 2
    ds = load_dataset(
        UploadSpec(id=info.id), data_dir=tmp_path, upload_dir=tmp_path, allow_local_paths=False
    )
    assert ds.class_names == ["a", "b"] and ds.X.tolist() == [[9, 1], [9, 2]]


def test_same_bytes_same_id(tmp_path: Path) -> None:
    first = store_upload(CSV, "one.csv", tmp_path)
    second = store_upload(CSV, "two.csv", tmp_path)
    assert second == first  # the stored entry, including the first name and time
    assert len(list(tmp_path.iterdir())) == 2
    other = store_upload(CSV + b"7,8,dog\n", "one.csv", tmp_path)
    assert other.id != first.id
    assert [i.id for i in list_uploads(tmp_path)] == [first.id, other.id]


def test_same_bytes_other_label_column_conflicts(tmp_path: Path) -> None:
    content = b"a,label,kind\n1,0,5\n2,1,6\n"
    store_upload(content, "d.csv", tmp_path)
    with pytest.raises(ConflictError, match="already uploaded"):
        store_upload(content, "d.csv", tmp_path, label_column="kind")


def test_file_name_never_becomes_a_path(tmp_path: Path) -> None:
    upload_dir = tmp_path / "uploads"
    info = store_upload(CSV, "../../evil\x00\n.csv", upload_dir)
    assert info.filename == "evil.csv"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["uploads", f"{info.id}.csv", f"{info.id}.json"]
    )
    assert (
        store_upload(CSV + b"1,1,cat\n", "C:\\Users\\x\\data.csv", upload_dir).filename
        == "data.csv"
    )


@pytest.mark.parametrize("name", ["data.txt", "data", "data.csv.exe", "data.npy"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError, match="unsupported file type") as info:
        store_upload(CSV, name, tmp_path / "uploads")
    assert info.value.field == "file"
    assert not (tmp_path / "uploads").exists()


def test_bad_data_is_not_stored(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        store_upload(b"a,b,label\n1,2,0\n3,x,1\n", "bad.csv", tmp_path / "uploads")
    assert info.value.field == "bad.csv:line 3" and "non-numeric value 'x'" in info.value.message
    with pytest.raises(DatasetError) as missing:
        store_upload(CSV, "bad.csv", tmp_path / "uploads", label_column="y")
    assert missing.value.field == "label_column"
    with pytest.raises(DatasetError, match="object"):
        store_upload(
            npz_bytes(X=np.array([[None]], dtype=object), y=np.array([0])),
            "x.npz",
            tmp_path / "uploads",
        )
    assert list(tmp_path.iterdir()) == []  # not even the upload folder was created


@pytest.mark.parametrize(
    "upload_id", ["0123456789abcdef0123456789abcdef", "../x", "ABCDEF0123456789", ""]
)
def test_unknown_ids(tmp_path: Path, upload_id: str) -> None:
    with pytest.raises(NotFoundError) as info:
        get_upload_info(upload_id, tmp_path)
    assert isinstance(info.value, KeyError) and info.value.field == "id"


def test_unknown_upload_in_a_spec(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_upload("0123456789abcdef0123456789abcdef", tmp_path)
    assert info.value.field == "dataset.id" and "no uploaded dataset" in info.value.message


def test_list_ignores_partial_and_corrupt_entries(tmp_path: Path) -> None:
    info = store_upload(CSV, "pets.csv", tmp_path)
    (tmp_path / ".tmp-abc").write_bytes(b"half a file")
    (tmp_path / ("f" * 32 + ".json")).write_text("{not json")
    (tmp_path / ("e" * 32 + ".csv")).write_bytes(CSV)  # data without metadata: invisible
    assert list_uploads(tmp_path) == [info]
    assert isinstance(list_uploads(tmp_path)[0], DatasetInfo)
    assert list_uploads(tmp_path / "absent") == []


def test_upload_ids_are_not_data_dir_paths(tmp_path: Path) -> None:
    # A csv spec cannot reach the upload folder through data_dir either.
    info = store_upload(CSV, "pets.csv", tmp_path / "uploads")
    with pytest.raises(DatasetError, match=r"'\.\.'"):
        load_dataset(
            CsvSpec(path=f"../uploads/{info.id}.csv"),
            data_dir=tmp_path / "data",
            upload_dir=tmp_path / "uploads",
            allow_local_paths=False,
        )
