from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.datasets import (
    BUILTIN_DATASETS,
    DATASET_NAMES,
    Dataset,
    DigitsSpec,
    FashionMnistSpec,
    MnistSpec,
    SyntheticSpec,
    clear_dataset_cache,
    describe_builtin_datasets,
    downloads_enabled,
    idx,
    load_dataset,
)
from service.datasets.builtin import load_synthetic
from service.errors import DatasetError


def load(spec: Any, data_dir: Path, **kwargs: Any) -> Dataset:
    return load_dataset(
        spec, data_dir=data_dir, upload_dir=data_dir / "uploads", allow_local_paths=False, **kwargs
    )


def assert_valid(ds: Dataset) -> None:
    assert ds.X.dtype == np.float32 and ds.X.ndim == 2 and ds.X.flags.c_contiguous
    assert ds.y.dtype == np.int64 and ds.y.shape == (len(ds.X),)
    assert ds.y.min() >= 0 and ds.y.max() < ds.n_classes == len(ds.class_names)
    assert not ds.X.flags.writeable and not ds.y.flags.writeable


# digits and synthetic -------------------------------------------------------------------------


def test_digits(tmp_path: Path) -> None:
    ds = load(DigitsSpec(), tmp_path)
    assert_valid(ds)
    assert ds.X.shape == (1797, 64)
    assert ds.X.min() == 0.0 and ds.X.max() == 1.0
    assert ds.class_names == [str(d) for d in range(10)]
    assert np.bincount(ds.y).tolist()[:3] == [178, 182, 177]


def test_synthetic_shape_and_determinism(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_samples=300, n_features=7, n_classes=3, seed=5)
    ds = load(spec, tmp_path)
    assert_valid(ds)
    assert ds.X.shape == (300, 7) and ds.n_classes == 3
    clear_dataset_cache()
    again = load(spec, tmp_path)
    assert again is not ds
    np.testing.assert_array_equal(again.X, ds.X)
    np.testing.assert_array_equal(again.y, ds.y)
    other = load(spec.model_copy(update={"seed": 6}), tmp_path)
    assert not np.array_equal(other.X, ds.X)


def test_synthetic_sklearn_refusal_becomes_dataset_error() -> None:
    # Bypass the spec validator to reach make_classification's own check.
    spec = SyntheticSpec.model_construct(
        name="synthetic",
        n_samples=100,
        n_features=2,
        n_classes=8,
        n_informative=1,
        n_clusters_per_class=2,
        seed=0,
    )
    with pytest.raises(DatasetError, match="make_classification refused"):
        load_synthetic(spec, max_rows=10**6, max_features=10**6)


def test_builtin_catalogue(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    assert {d["name"] for d in BUILTIN_DATASETS} <= set(DATASET_NAMES)
    offline = {d["name"]: d["offline"] for d in BUILTIN_DATASETS}
    assert offline == {"digits": True, "mnist": False, "fashion_mnist": False, "synthetic": True}
    before = {d["name"]: d["available"] for d in describe_builtin_datasets(tmp_path)}
    assert before == {"digits": True, "mnist": False, "fashion_mnist": False, "synthetic": True}
    write_idx(tmp_path / "mnist", "test", n=20)
    after = {d["name"]: d["available"] for d in describe_builtin_datasets(tmp_path)}
    assert after["mnist"] and not after["fashion_mnist"]


# MNIST / Fashion-MNIST from IDX files --------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("subdir", ["mnist", ""], ids=["data_dir/mnist", "data_dir"])
def test_mnist_from_idx(
    tmp_path: Path, write_idx: Callable[..., Any], gz: bool, subdir: str
) -> None:
    images, labels = write_idx(tmp_path / subdir if subdir else tmp_path, "train", n=60, gz=gz)
    ds = load(MnistSpec(), tmp_path)
    assert_valid(ds)
    assert ds.name == "mnist:train" and ds.X.shape == (60, 784)
    np.testing.assert_allclose(ds.X, images.reshape(60, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.class_names == [str(d) for d in range(10)]


def test_raw_file_with_gz_name_is_detected_by_magic_bytes(
    tmp_path: Path, write_idx: Callable[..., Any]
) -> None:
    write_idx(tmp_path / "mnist", "test", n=20, gz=False)
    for f in (tmp_path / "mnist").iterdir():
        f.rename(f.with_name(f.name + ".gz"))
    assert load(MnistSpec(), tmp_path).X.shape == (20, 784)


def test_fashion_mnist(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    _, labels = write_idx(tmp_path / "fashion_mnist", "train", n=30, gz=True)
    ds = load(FashionMnistSpec(), tmp_path)
    assert_valid(ds)
    assert ds.name == "fashion_mnist:train"
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.y, labels)


def test_fashion_mnist_is_not_looked_for_in_data_dir_itself(
    tmp_path: Path, write_idx: Callable[..., Any]
) -> None:
    write_idx(tmp_path, "train", n=30)  # these are MNIST's place, not Fashion-MNIST's
    with pytest.raises(DatasetError, match="fashion_mnist/"):
        load(FashionMnistSpec(), tmp_path)


def test_split_auto_prefers_train_then_t10k(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "test", n=20, seed=1)
    t10k_only = load(MnistSpec(), tmp_path)
    assert t10k_only.name == "mnist:test" and len(t10k_only.X) == 20

    write_idx(tmp_path / "mnist", "train", n=60, seed=2)
    clear_dataset_cache()
    assert len(load(MnistSpec(), tmp_path).X) == 60
    assert len(load(MnistSpec(split="test"), tmp_path).X) == 20
    assert len(load(MnistSpec(split="train"), tmp_path).X) == 60


def test_limit_keeps_the_first_rows(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    _, labels = write_idx(tmp_path / "mnist", "train", n=60)
    ds = load(MnistSpec(limit=25), tmp_path)
    assert ds.X.shape == (25, 784)
    np.testing.assert_array_equal(ds.y, labels[:25])
    assert len(load(MnistSpec(limit=1000), tmp_path).X) == 60


def test_missing_mnist_offline_lists_the_files(tmp_path: Path, tree: Callable[..., Any]) -> None:
    before = tree(tmp_path)
    with pytest.raises(DatasetError) as info:
        load(MnistSpec(), tmp_path)
    message = str(info.value)
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert name in message
    assert f"{tmp_path / 'mnist'}/" in message and f"{tmp_path}/" in message
    assert "HPO_OFFLINE=1" in message
    assert info.value.field == "dataset.name"
    assert tree(tmp_path) == before  # no folder was created


def test_missing_train_split_names_only_train_files(
    tmp_path: Path, write_idx: Callable[..., Any]
) -> None:
    write_idx(tmp_path / "mnist", "test", n=20)
    with pytest.raises(DatasetError) as info:
        load(MnistSpec(split="train"), tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "t10k-images" not in str(info.value)


def test_half_a_pair_is_not_a_split(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "test", n=20)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load(MnistSpec(), tmp_path)


def test_truncated_gzip(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=True)
    f = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(DatasetError) as info:
        load(MnistSpec(), tmp_path)
    assert "truncated" in str(info.value)
    assert info.value.field == "mnist/train-images-idx3-ubyte.gz"


def test_truncated_raw_file_reports_sizes(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=False)
    f = tmp_path / "mnist" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    expected = 16 + 60 * 784
    with pytest.raises(
        DatasetError, match=rf"{expected - 100:,} bytes .* needs {expected:,}.*truncated"
    ):
        load(MnistSpec(), tmp_path)


def test_truncated_header(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match="truncated"):
        load(MnistSpec(), tmp_path)


def test_swapped_files_fail_the_magic_check(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=False)
    d = tmp_path / "mnist"
    (d / "train-images-idx3-ubyte").rename(d / "tmp")
    (d / "train-labels-idx1-ubyte").rename(d / "train-images-idx3-ubyte")
    (d / "tmp").rename(d / "train-labels-idx1-ubyte")
    with pytest.raises(DatasetError, match="magic number 2051, expected 2049"):
        load(MnistSpec(), tmp_path)


def test_image_and_label_counts_must_match(
    tmp_path: Path, write_idx: Callable[..., Any], idx_bytes: Callable[..., bytes]
) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=False)
    labels = np.arange(59, dtype=np.uint8) % 10
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    with pytest.raises(DatasetError, match="60 items but its partner file holds 59"):
        load(MnistSpec(), tmp_path)


def test_label_out_of_range(
    tmp_path: Path, write_idx: Callable[..., Any], idx_bytes: Callable[..., bytes]
) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=False)
    labels = np.arange(60, dtype=np.uint8) % 10
    labels[7] = 12
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    with pytest.raises(DatasetError, match=r"label 12 at index 7 is outside 0\.\.9"):
        load(MnistSpec(), tmp_path)


def test_trailing_data_in_gzip(
    tmp_path: Path, idx_bytes: Callable[..., bytes], write_idx: Callable[..., Any]
) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=True)
    labels = np.arange(60, dtype=np.uint8) % 10
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(idx_bytes(labels, 2049) + b"junk"))
    with pytest.raises(DatasetError, match="data after its last item"):
        load(MnistSpec(), tmp_path)


# Downloads, with a fake network ----------------------------------------------------------------


class _Response(io.BytesIO):
    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fake_mirror(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], *, fix_md5: bool = True
) -> list[str]:
    calls: list[str] = []

    def urlopen(request: Any, timeout: float) -> _Response:
        url = request if isinstance(request, str) else request.full_url
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if name == "":
            return _Response(b"")  # the HEAD probe of the mirror root
        return _Response(files[name])

    monkeypatch.setattr(idx, "_urlopen", urlopen)
    if fix_md5:
        md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
        monkeypatch.setitem(idx.IDX_SOURCES, "mnist", dataclasses.replace(idx.MNIST, md5=md5))
    return calls


def _mnist_gz_files(idx_bytes: Callable[..., bytes], prefix: str, n: int) -> dict[str, bytes]:
    images = np.full((n, 28, 28), 255, dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    return {
        f"{prefix}-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images, 2051)),
        f"{prefix}-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels, 2049)),
    }


def test_download_when_missing_and_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_bytes: Callable[..., bytes]
) -> None:
    calls = _fake_mirror(monkeypatch, _mnist_gz_files(idx_bytes, "train", 40))
    ds = load(MnistSpec(), tmp_path, download=True)
    assert ds.X.shape == (40, 784) and float(ds.X.max()) == 1.0
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    assert calls[0] == idx.MNIST.mirror  # the short probe comes first
    assert calls[1] == idx.MNIST.mirror + "train-images-idx3-ubyte.gz"


def test_download_of_t10k_for_split_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_bytes: Callable[..., bytes]
) -> None:
    _fake_mirror(monkeypatch, _mnist_gz_files(idx_bytes, "t10k", 20))
    assert load(MnistSpec(split="test"), tmp_path, download=True).name == "mnist:test"


def test_download_with_wrong_checksum_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_bytes: Callable[..., bytes]
) -> None:
    _fake_mirror(monkeypatch, _mnist_gz_files(idx_bytes, "train", 40), fix_md5=False)
    with pytest.raises(DatasetError, match="md5"):
        load(MnistSpec(), tmp_path, download=True)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_unreachable_network_lists_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def urlopen(request: Any, timeout: float) -> Any:
        assert timeout <= 3.0
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(idx, "_urlopen", urlopen)
    with pytest.raises(DatasetError, match="unreachable") as info:
        load(MnistSpec(), tmp_path, download=True)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert not (tmp_path / "mnist").exists()


def test_offline_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert downloads_enabled(None) is False  # the autouse fixture sets HPO_OFFLINE=1
    monkeypatch.delenv("HPO_OFFLINE")
    assert downloads_enabled(None) is True
    monkeypatch.setenv("HPO_OFFLINE", "0")
    assert downloads_enabled(None) is True
    monkeypatch.setenv("HPO_OFFLINE", "true")
    assert downloads_enabled(None) is False
    assert downloads_enabled(True) is True and downloads_enabled(False) is False


def test_mixed_raw_and_gzip_files(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    write_idx(tmp_path / "mnist", "train", n=60, gz=True)
    gz = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    assert load(MnistSpec(), tmp_path).X.shape == (60, 784)
