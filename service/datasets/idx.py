"""MNIST and Fashion-MNIST from IDX files (LeCun's format), gzipped or raw.

Where the files are looked for, in order (the first folder holding both files of a split wins):

- MNIST: ``data_dir/mnist/``, then ``data_dir`` itself (a plain folder of the four files works);
- Fashion-MNIST: ``data_dir/fashion_mnist/`` only (its file names are the same as MNIST's).

Each file may be named with or without ``.gz``; compression is detected by the gzip magic bytes,
not the name. Split ``auto`` takes the 60,000 ``train-*`` images when present, else the 10,000
``t10k-*`` images. When the files are missing, they are downloaded into ``data_dir/<name>/``
only if downloads are enabled (``download=True``, or ``None`` and ``HPO_OFFLINE`` unset) and a
3-second probe reaches the mirror; otherwise the error names each file and folder.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from service.datasets.dataset import Dataset, check_limits
from service.errors import DatasetError, LimitExceededError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
PROBE_TIMEOUT_S = 3.0  # an offline machine should fail fast, not hang on a job submission
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation; the largest file is ~26 MB
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # the largest real file is ~26 MB; refuse anything huge
OFFLINE_ENV = "HPO_OFFLINE"
FIELD = "dataset.name"

Split = Literal["train", "test"]
SPLIT_FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset family: where its files live and where to fetch them."""

    name: str
    title: str
    subdirs: tuple[str, ...]  # searched in order under data_dir; "" is data_dir itself
    mirror: str
    md5: dict[str, str]  # of the published .gz files (the checksums torchvision uses)
    class_names: tuple[str, ...]

    def folders(self, data_dir: Path) -> list[Path]:
        return [data_dir / s if s else data_dir for s in self.subdirs]


MNIST = IdxSource(
    name="mnist",
    title="MNIST",
    subdirs=("mnist", ""),
    mirror="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    class_names=tuple(str(d) for d in range(10)),
)
FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    title="Fashion-MNIST",
    subdirs=("fashion_mnist",),
    mirror="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)
IDX_SOURCES = {s.name: s for s in (MNIST, FASHION_MNIST)}

# Module-level so tests can replace it: they must never reach the network.
_urlopen = urllib.request.urlopen


def downloads_enabled(download: bool | None) -> bool:
    """An explicit True/False wins; None means 'unless HPO_OFFLINE is set to a true value'."""
    if download is not None:
        return download
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in {"1", "true", "yes", "on"}


def find_split(source: IdxSource, data_dir: Path, split: Split) -> tuple[Path, Path] | None:
    """(images, labels) from the first folder that holds both files of ``split``, else None."""
    for folder in source.folders(data_dir):
        found = [_find_file(folder, base) for base in SPLIT_FILES[split]]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _find_file(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_files(
    source: IdxSource,
    data_dir: Path,
    split: Literal["auto", "train", "test"],
    *,
    download: bool | None,
) -> tuple[Split, Path, Path]:
    """Find (or fetch) the files for ``split``; returns (resolved split, images, labels)."""
    order: list[Split] = ["train", "test"] if split == "auto" else [split]
    for candidate in order:
        found = find_split(source, data_dir, candidate)
        if found is not None:
            return candidate, found[0], found[1]
    wanted: Split = order[0]
    if not downloads_enabled(download):
        raise DatasetError(
            _missing_message(source, data_dir, split, f"{OFFLINE_ENV}=1 disables downloads"),
            field=FIELD,
        )
    if not _reachable(source.mirror):
        raise DatasetError(
            _missing_message(source, data_dir, split, f"{source.mirror} is unreachable"),
            field=FIELD,
        )
    target = data_dir / source.subdirs[0]
    _download(source, wanted, target)
    found = find_split(source, data_dir, wanted)
    if found is None:  # pragma: no cover - _download either writes both files or raises
        raise DatasetError(
            _missing_message(source, data_dir, split, "the download failed"), field=FIELD
        )
    return wanted, found[0], found[1]


def _missing_message(source: IdxSource, data_dir: Path, split: str, why: str) -> str:
    folders = " or ".join(f"{f}/" for f in source.folders(data_dir))
    options = {
        "train": "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (60,000 images)",
        "test": "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (10,000 images)",
    }
    needed = " or ".join(options.values()) if split == "auto" else options[split]
    return (
        f"{source.title} files for split {split!r} not found. Put {needed} into {folders} "
        f"(the .gz suffix is optional; raw files work too). They are published at "
        f"{source.mirror}; no automatic download: {why}."
    )


def _reachable(url: str) -> bool:
    """Whether ``url`` answers within PROBE_TIMEOUT_S, DNS included (urllib's timeout does not
    cover name resolution, so the probe runs in a thread that is abandoned when late)."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            with _urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S):
                outcome.append(None)
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="hpo-dataset-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if not outcome:
        return False
    error = outcome[0]
    if error is None or isinstance(error, urllib.error.HTTPError):
        return True  # any HTTP answer (e.g. 403 on a bucket root) means the network works
    if isinstance(error, urllib.error.URLError | OSError | ValueError):
        return False
    raise error


def _download(source: IdxSource, split: Split, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for base in SPLIT_FILES[split]:
        name = f"{base}.gz"
        url = source.mirror + name
        try:
            with _urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DatasetError(
                f"downloading {url} failed ({exc}); put {name} into {target}/ by hand", field=FIELD
            ) from None
        if len(data) > MAX_DOWNLOAD_BYTES:
            raise DatasetError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes", field=FIELD)
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != source.md5[name]:
            raise DatasetError(
                f"{url} has md5 {digest}, expected {source.md5[name]}; not saved", field=FIELD
            )
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_idx(
    path: Path,
    *,
    magic: int,
    shown: str,
    limit: int | None = None,
    expect_count: int | None = None,
    check_shape: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """Read an IDX file of unsigned bytes: (array of the first ``limit`` items, count in header).

    Validates the magic number (which fixes the element type, unsigned bytes, and the rank),
    the item count (``expect_count``) and that the data is as long as the header says: a
    truncated file, raw or gzipped, is an error.
    ``check_shape(rows, features)`` runs before the data is read (the limit checks).
    """
    try:
        with path.open("rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream: IO[bytes] = raw
            if gz:
                stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
            head = _read_exact(stream, 4, shown, "header")
            found = int.from_bytes(head, "big")
            if found != magic:
                raise DatasetError(
                    f"{shown} has magic number {found}, expected {magic} "
                    f"({'an images' if magic == IMAGES_MAGIC else 'a labels'} file); "
                    "is it an IDX file, and are images and labels swapped?",
                    field=shown,
                )
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, shown, "header"))
            count, item = dims[0], math.prod(dims[1:])
            if expect_count is not None and count != expect_count:
                raise DatasetError(
                    f"{shown} holds {count:,} items but its partner file holds {expect_count:,}; "
                    "images and labels must match",
                    field=shown,
                )
            if item == 0:
                raise DatasetError(f"{shown} has an empty item shape {dims[1:]}", field=shown)
            rows = count if limit is None else min(count, limit)
            if check_shape is not None:
                check_shape(rows, item)
            header_size = 4 + 4 * ndim
            if not gz:
                expected = header_size + count * item
                actual = os.fstat(raw.fileno()).st_size
                if actual != expected:
                    raise DatasetError(
                        f"{shown} is {actual:,} bytes but its header ({count:,} items of "
                        f"{dims[1:]}) needs {expected:,}: the file is "
                        f"{'truncated' if actual < expected else 'longer than it should be'}",
                        field=shown,
                    )
            data = _read_exact(stream, rows * item, shown, f"{rows:,} items")
            if gz and rows == count and stream.read(1):
                raise DatasetError(f"{shown} has data after its last item", field=shown)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(
            f"{shown} is a truncated or corrupt gzip file ({exc})", field=shown
        ) from None
    except OSError as exc:
        raise DatasetError(f"cannot read {shown}: {exc}", field=shown) from None
    return np.frombuffer(data, dtype=np.uint8).reshape((rows, *dims[1:])), count


def _read_exact(stream: IO[bytes], n: int, shown: str, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DatasetError(
            f"{shown} is truncated: expected {n:,} bytes of {what}, got {len(data):,}", field=shown
        )
    return data


def load_idx(
    source: IdxSource,
    images: Path,
    labels: Path,
    *,
    split: Split,
    data_dir: Path,
    limit: int | None,
    max_rows: int,
    max_features: int,
    limit_error: type[LimitExceededError] = LimitExceededError,
) -> Dataset:
    """Read one split's images and labels into a Dataset with pixels scaled to [0, 1]."""
    shown_labels, shown_images = _shown(labels, data_dir), _shown(images, data_dir)
    y_raw, n_labels = read_idx(labels, magic=LABELS_MAGIC, shown=shown_labels, limit=limit)

    def check(rows: int, features: int) -> None:
        check_limits(
            rows,
            features,
            max_rows=max_rows,
            max_features=max_features,
            field=FIELD,
            error=limit_error,
        )

    X_raw, _ = read_idx(
        images,
        magic=IMAGES_MAGIC,
        shown=shown_images,
        limit=limit,
        expect_count=n_labels,
        check_shape=check,
    )
    k = len(source.class_names)
    if y_raw.ndim != 1:
        raise DatasetError(
            f"{shown_labels} must be 1-D, got item shape {y_raw.shape[1:]}", field=shown_labels
        )
    bad = np.flatnonzero(y_raw >= k)
    if bad.size:
        raise DatasetError(
            f"{shown_labels}: label {int(y_raw[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{k - 1}",
            field=shown_labels,
        )
    X = X_raw.reshape(len(X_raw), -1).astype(np.float32)
    X /= np.float32(255.0)
    return Dataset(
        name=f"{source.name}:{split}",
        X=X,
        y=y_raw.astype(np.int64),
        n_classes=k,
        class_names=list(source.class_names),
    )


def _shown(path: Path, data_dir: Path) -> str:
    """A file's name relative to data_dir for messages (the server's layout stays private)."""
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return path.name
