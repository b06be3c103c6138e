from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.datasets import (
    CsvSpec,
    Dataset,
    DigitsSpec,
    MnistSpec,
    SyntheticSpec,
    clear_dataset_cache,
    load_dataset,
    loader,
)
from service.errors import LimitExceededError


def load(spec: Any, data_dir: Path, **kwargs: Any) -> Dataset:
    return load_dataset(
        spec, data_dir=data_dir, upload_dir=data_dir / "uploads", allow_local_paths=False, **kwargs
    )


@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = loader.parse_csv

    def counting(content: bytes, **kwargs: Any) -> Dataset:
        calls.append(kwargs["source"])
        return real(content, **kwargs)

    monkeypatch.setattr(loader, "parse_csv", counting)
    return calls


def test_second_load_is_the_same_object_without_rereading(
    tmp_path: Path, parse_calls: list[str]
) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\n2,1\n")
    first = load(CsvSpec(path="d.csv"), tmp_path)
    second = load(CsvSpec(path="d.csv"), tmp_path)
    assert second is first
    assert parse_calls == ["d.csv"]


def test_a_changed_file_is_read_again(tmp_path: Path, parse_calls: list[str]) -> None:
    f = tmp_path / "d.csv"
    f.write_text("a,label\n1,0\n2,1\n")
    first = load(CsvSpec(path="d.csv"), tmp_path)
    f.write_text("a,label\n1,0\n2,1\n3,1\n")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load(CsvSpec(path="d.csv"), tmp_path)
    assert second is not first and len(second.X) == 3
    assert len(parse_calls) == 2


def test_clear_and_other_specs(tmp_path: Path, parse_calls: list[str]) -> None:
    (tmp_path / "d.csv").write_text("a,label,other\n1,0,5\n2,1,6\n")
    first = load(CsvSpec(path="d.csv"), tmp_path)
    assert load(CsvSpec(path="d.csv", label_column="label"), tmp_path) is first
    assert load(CsvSpec(path="./d.csv"), tmp_path) is not first  # another spec JSON
    clear_dataset_cache()
    assert load(CsvSpec(path="d.csv"), tmp_path) is not first
    assert len(parse_calls) == 3


def test_builtins_are_cached(tmp_path: Path, write_idx: Callable[..., Any]) -> None:
    assert load(DigitsSpec(), tmp_path) is load(DigitsSpec(), tmp_path)
    assert load(SyntheticSpec(), tmp_path) is load(SyntheticSpec(), tmp_path)
    write_idx(tmp_path / "mnist", "test", n=20)
    assert load(MnistSpec(), tmp_path) is load(MnistSpec(), tmp_path)


def test_least_recently_used_entry_is_evicted(tmp_path: Path) -> None:
    specs = [SyntheticSpec(n_samples=50, seed=s) for s in range(loader.CACHE_SIZE + 1)]
    first = load(specs[0], tmp_path)
    for spec in specs[1:]:
        load(spec, tmp_path)
    assert load(specs[-1], tmp_path) is load(specs[-1], tmp_path)
    assert load(specs[0], tmp_path) is not first


def test_limits_apply_to_cached_datasets(tmp_path: Path) -> None:
    load(DigitsSpec(), tmp_path)
    with pytest.raises(LimitExceededError, match="1,797 rows; the limit is 1,000"):
        load(DigitsSpec(), tmp_path, max_rows=1000)
