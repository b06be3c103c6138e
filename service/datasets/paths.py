"""Turning a user-supplied dataset path into a file we may read; nothing here creates anything.

Server mode (``allow_local_paths=False``): the path is relative to ``data_dir``, has no ``..``
component and no NUL byte, and neither the file nor any folder between it and ``data_dir`` is
a symlink, so a job spec can only read files an operator put under ``data_dir``. The final
open uses ``O_NOFOLLOW`` so a file swapped for a symlink after the check is refused too.
Local mode (the CLI on the user's own machine): any existing regular file, relative to cwd.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from service.errors import DatasetError

FIELD = "dataset.path"


def resolve_dataset_path(raw: str, *, data_dir: Path, allow_local_paths: bool) -> Path:
    """Return the absolute path of an existing regular file, or raise DatasetError(field=path)."""
    if "\x00" in raw:
        raise DatasetError("the path contains a NUL byte", field=FIELD)
    if not raw.strip():
        raise DatasetError("the path is empty", field=FIELD)
    if allow_local_paths:
        path = Path(raw).expanduser()
        try:
            st = path.stat()
        except OSError as exc:
            raise DatasetError(f"cannot open {raw!r}: {exc.strerror}", field=FIELD) from None
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{raw!r} is not a regular file", field=FIELD)
        return path.resolve()
    return _resolve_under(raw, data_dir)


def _resolve_under(raw: str, data_dir: Path) -> Path:
    if (
        PurePosixPath(raw).is_absolute()
        or PureWindowsPath(raw).is_absolute()
        or raw.startswith(("\\", "~"))
        or PureWindowsPath(raw).drive
    ):
        raise DatasetError(
            f"{raw!r} is absolute; on the server a dataset path is relative to the data directory",
            field=FIELD,
        )
    # Backslashes count as separators too, so 'a\\..\\b' cannot sneak a '..' through.
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{raw!r} contains a '..' component", field=FIELD)
    if not parts:
        raise DatasetError(f"{raw!r} names no file", field=FIELD)
    try:
        root = data_dir.resolve(strict=True)
    except OSError:
        raise DatasetError(
            f"the data directory does not exist, so {raw!r} cannot be found", field=FIELD
        ) from None
    current = root
    for i, part in enumerate(parts):
        current = current / part
        shown = "/".join(parts[: i + 1])
        try:
            st = current.lstat()
        except OSError:
            raise DatasetError(f"{shown!r} not found in the data directory", field=FIELD) from None
        if stat.S_ISLNK(st.st_mode):
            raise DatasetError(
                f"{shown!r} is a symlink; symlinks are not followed under the data directory",
                field=FIELD,
            )
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise DatasetError(f"{shown!r} is not a directory", field=FIELD)
        if last and not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{raw!r} is not a regular file", field=FIELD)
    if not current.resolve().is_relative_to(root):  # belt and braces: no symlink was walked
        raise DatasetError(f"{raw!r} resolves outside the data directory", field=FIELD)
    return current


def read_file(path: Path, *, follow_symlinks: bool) -> bytes:
    """Read a whole file; with ``follow_symlinks=False`` a symlink at ``path`` is refused."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DatasetError(f"cannot open {path.name!r}: {exc.strerror}", field=FIELD) from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def file_stamp(path: Path) -> tuple[str, int, int, int]:
    """What makes a cached load stale: (path, mtime in ns, size, inode)."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
