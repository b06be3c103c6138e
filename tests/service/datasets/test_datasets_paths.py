from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.datasets import CsvSpec, Dataset, NpzSpec, load_dataset
from service.errors import DatasetError

CSV = b"a,b,label\n1,2,0\n3,4,1\n"


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """data_dir with data.csv and sub/nested.csv; a secret.csv next to (outside) data_dir."""
    data_dir = tmp_path / "data"
    (data_dir / "sub").mkdir(parents=True)
    (data_dir / "data.csv").write_bytes(CSV)
    (data_dir / "sub" / "nested.csv").write_bytes(CSV)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_bytes(CSV)
    (tmp_path / "secret.csv").write_bytes(CSV)
    return data_dir, outside


def server_load(path: str, data_dir: Path) -> Dataset:
    return load_dataset(
        CsvSpec(path=path),
        data_dir=data_dir,
        upload_dir=data_dir.parent / "uploads",
        allow_local_paths=False,
    )


def server_error(path: str, data_dir: Path, tree: Callable[[Path], set[str]]) -> DatasetError:
    root = data_dir.parent
    before = tree(root)
    with pytest.raises(DatasetError) as info:
        server_load(path, data_dir)
    assert info.value.field == "dataset.path"
    assert tree(root) == before  # nothing created
    return info.value


@pytest.mark.parametrize("path", ["data.csv", "./data.csv", "sub/nested.csv", "sub//nested.csv"])
def test_server_accepts_relative_paths_inside(layout: tuple[Path, Path], path: str) -> None:
    assert server_load(path, layout[0]).X.shape == (2, 2)


@pytest.mark.parametrize("path", ["../secret.csv", "sub/../../secret.csv", "..\\secret.csv", ".."])
def test_dotdot_is_refused(
    layout: tuple[Path, Path], path: str, tree: Callable[..., set[str]]
) -> None:
    assert "'..'" in server_error(path, layout[0], tree).message


def test_absolute_path_is_refused(layout: tuple[Path, Path], tree: Callable[..., set[str]]) -> None:
    data_dir, _ = layout
    err = server_error(str(data_dir / "data.csv"), data_dir, tree)
    assert "absolute" in err.message


@pytest.mark.parametrize("path", ["~/secret.csv", "C:\\secret.csv", "\\\\host\\share\\x.csv"])
def test_other_absolute_forms_are_refused(
    layout: tuple[Path, Path], path: str, tree: Callable[..., set[str]]
) -> None:
    assert "absolute" in server_error(path, layout[0], tree).message


def test_nul_byte_is_refused(layout: tuple[Path, Path], tree: Callable[..., set[str]]) -> None:
    assert "NUL byte" in server_error("data.csv\x00.txt", layout[0], tree).message


def test_symlink_to_a_file_outside_is_refused(
    layout: tuple[Path, Path], tree: Callable[..., set[str]]
) -> None:
    data_dir, outside = layout
    (data_dir / "link.csv").symlink_to(outside / "secret.csv")
    err = server_error("link.csv", data_dir, tree)
    assert "symlink" in err.message


def test_symlink_inside_data_dir_is_refused_too(
    layout: tuple[Path, Path], tree: Callable[..., set[str]]
) -> None:
    data_dir, _ = layout
    (data_dir / "alias.csv").symlink_to(data_dir / "data.csv")
    assert "symlink" in server_error("alias.csv", data_dir, tree).message


def test_symlinked_parent_folder_is_refused(
    layout: tuple[Path, Path], tree: Callable[..., set[str]]
) -> None:
    data_dir, outside = layout
    (data_dir / "linked").symlink_to(outside, target_is_directory=True)
    err = server_error("linked/secret.csv", data_dir, tree)
    assert "'linked' is a symlink" in err.message


def test_missing_file_and_folder(layout: tuple[Path, Path], tree: Callable[..., set[str]]) -> None:
    data_dir, _ = layout
    assert "not found" in server_error("nope.csv", data_dir, tree).message
    assert "not a regular file" in server_error("sub", data_dir, tree).message
    assert "not a directory" in server_error("data.csv/x.csv", data_dir, tree).message


def test_missing_data_dir_creates_nothing(tmp_path: Path, tree: Callable[..., set[str]]) -> None:
    before = tree(tmp_path)
    with pytest.raises(DatasetError, match="data directory does not exist"):
        server_load("data.csv", tmp_path / "absent")
    assert tree(tmp_path) == before


def test_npz_paths_are_checked_the_same_way(layout: tuple[Path, Path]) -> None:
    data_dir, _ = layout
    with pytest.raises(DatasetError, match=r"'\.\.'"):
        load_dataset(
            NpzSpec(path="../x.npz"),
            data_dir=data_dir,
            upload_dir=data_dir,
            allow_local_paths=False,
        )


def test_local_mode_accepts_absolute_relative_and_symlinks(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, outside = layout

    def local(path: str) -> Dataset:
        return load_dataset(
            CsvSpec(path=path), data_dir=data_dir, upload_dir=data_dir, allow_local_paths=True
        )

    assert local(str(outside / "secret.csv")).X.shape == (2, 2)
    monkeypatch.chdir(outside)
    assert local("secret.csv").X.shape == (2, 2)  # relative to cwd, not data_dir
    (outside / "link.csv").symlink_to(outside / "secret.csv")
    assert local("link.csv").X.shape == (2, 2)
    with pytest.raises(DatasetError, match="cannot open") as info:
        local("missing.csv")
    assert info.value.field == "dataset.path"
    with pytest.raises(DatasetError, match="NUL"):
        local("a\x00b")


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="needs O_NOFOLLOW")
def test_final_open_does_not_follow_a_swapped_in_symlink(layout: tuple[Path, Path]) -> None:
    from service.datasets.paths import read_file

    data_dir, outside = layout
    (data_dir / "swapped.csv").symlink_to(outside / "secret.csv")
    with pytest.raises(DatasetError, match="cannot open"):
        read_file(data_dir / "swapped.csv", follow_symlinks=False)
