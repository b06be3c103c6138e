"""Datasets uploaded to the server, stored under server-side ids.

Layout: ``upload_dir/<id>.<csv|npz>`` holds the bytes exactly as uploaded, and
``upload_dir/<id>.json`` the metadata (written last, so an id is visible only once complete).
``id`` is the first 32 hex digits of the content's sha256: the same bytes always get the same
id. The user's file name is kept for display only and never becomes a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service import defaults
from service.datasets.csv_format import parse_csv
from service.datasets.dataset import Dataset
from service.datasets.npz_format import parse_npz
from service.datasets.spec import UPLOAD_ID_PATTERN
from service.errors import (
    ConflictError,
    DatasetError,
    LimitExceededError,
    NotFoundError,
    PayloadTooLargeError,
)

log = logging.getLogger(__name__)

UploadFormat = Literal["csv", "npz"]
FORMATS: tuple[UploadFormat, ...] = ("csv", "npz")
ID_LENGTH = 32  # 128 bits of sha256: collisions are not a practical concern
_ID_RE = re.compile(UPLOAD_ID_PATTERN)
_MAX_NAME = 200  # characters of the original file name kept for display


class DatasetInfo(BaseModel):
    """What the server knows about an uploaded dataset (the ``<id>.json`` file)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    format: UploadFormat
    filename: str
    rows: int
    features: int
    n_classes: int
    class_names: list[str]
    label_column: str | None = None
    size_bytes: int
    created_at: datetime


def store_upload(
    content: bytes,
    filename: str,
    upload_dir: Path,
    *,
    max_rows: int = defaults.MAX_DATASET_ROWS,
    max_features: int = defaults.MAX_DATASET_FEATURES,
    label_column: str = "label",
    max_bytes: int = defaults.MAX_UPLOAD_BYTES,
) -> DatasetInfo:
    """Validate an uploaded file fully, then store it atomically; return its metadata.

    The format comes from the file name's extension (.csv or .npz). Invalid data raises
    ``DatasetError`` and stores nothing; a size, row or feature limit raises
    ``PayloadTooLargeError`` (a ``LimitExceededError``). Uploading the same bytes again returns
    the stored entry; the same bytes with a different ``label_column`` raise ``ConflictError``.
    """
    if len(content) > max_bytes:
        raise PayloadTooLargeError(
            f"the upload is {len(content):,} bytes; the limit is {max_bytes:,} (max_upload_bytes)",
            field="file",
        )
    fmt = _format_of(filename)
    shown = display_name(filename)
    dataset = _parse(content, fmt, shown, label_column, "label_column", max_rows, max_features)
    upload_id = hashlib.sha256(content).hexdigest()[:ID_LENGTH]
    stored_label = label_column if fmt == "csv" else None

    upload_dir.mkdir(parents=True, exist_ok=True)
    existing = _read_info(upload_id, upload_dir)
    if existing is not None and (upload_dir / f"{upload_id}.{existing.format}").is_file():
        if existing.format == fmt and existing.label_column == stored_label:
            return existing
        raise ConflictError(
            f"this file was already uploaded as {upload_id} ({existing.format}, label column "
            f"{existing.label_column!r}); the same bytes cannot be stored with other settings",
            field="label_column",
        )
    info = DatasetInfo(
        id=upload_id,
        format=fmt,
        filename=shown,
        rows=dataset.n_samples,
        features=dataset.n_features,
        n_classes=dataset.n_classes,
        class_names=dataset.class_names,
        label_column=stored_label,
        size_bytes=len(content),
        created_at=datetime.now(UTC),
    )
    _write_atomic(upload_dir / f"{upload_id}.{fmt}", content)
    _write_atomic(upload_dir / f"{upload_id}.json", info.model_dump_json(indent=2).encode())
    return info


def get_upload_info(upload_id: str, upload_dir: Path) -> DatasetInfo:
    """Metadata of a stored upload; ``NotFoundError`` for an unknown or malformed id."""
    info = _read_info(upload_id, upload_dir)
    if info is None or not (upload_dir / f"{upload_id}.{info.format}").is_file():
        raise NotFoundError(f"no uploaded dataset with id {upload_id!r}", field="id")
    return info


def list_uploads(upload_dir: Path) -> list[DatasetInfo]:
    """Every complete upload, oldest first."""
    if not upload_dir.is_dir():
        return []
    infos = []
    for meta in upload_dir.glob("*.json"):
        info = _read_info(meta.stem, upload_dir)
        if info is not None and (upload_dir / f"{info.id}.{info.format}").is_file():
            infos.append(info)
    return sorted(infos, key=lambda i: (i.created_at, i.id))


def upload_data_path(upload_id: str, upload_dir: Path) -> Path:
    """The stored file of an upload named in a job spec; DatasetError(field=dataset.id) if none."""
    info = _read_info(upload_id, upload_dir)
    path = upload_dir / f"{upload_id}.{info.format}" if info is not None else None
    if path is None or not path.is_file():
        raise DatasetError(f"no uploaded dataset with id {upload_id!r}", field="dataset.id")
    return path


def load_upload(upload_id: str, upload_dir: Path, *, max_rows: int, max_features: int) -> Dataset:
    """Parse a stored upload again, with the label column recorded at upload time."""
    info = _read_info(upload_id, upload_dir)
    if info is None:
        raise DatasetError(f"no uploaded dataset with id {upload_id!r}", field="dataset.id")
    path = upload_dir / f"{upload_id}.{info.format}"
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise DatasetError(
            f"upload {upload_id} cannot be read: {exc.strerror}", field="dataset.id"
        ) from None
    return _parse(
        content,
        info.format,
        f"upload {upload_id}",
        info.label_column or "label",
        "dataset.id",
        max_rows,
        max_features,
        name=f"upload:{upload_id}",
        limit_error=LimitExceededError,  # a job spec, not an upload: 422
    )


def display_name(filename: str) -> str:
    """The last path component, without control characters, for display only."""
    base = re.split(r"[\\/]", filename)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()
    return cleaned[:_MAX_NAME] or "upload"


def _format_of(filename: str) -> UploadFormat:
    suffix = Path(display_name(filename)).suffix.lower().lstrip(".")
    for fmt in FORMATS:
        if suffix == fmt:
            return fmt
    raise DatasetError(
        f"unsupported file type {('.' + suffix) if suffix else '(no extension)'}: upload a .csv "
        "(header row, numeric features, a label column) or a .npz (arrays X and y)",
        field="file",
    )


def _parse(
    content: bytes,
    fmt: UploadFormat,
    source: str,
    label_column: str,
    label_field: str,
    max_rows: int,
    max_features: int,
    *,
    name: str | None = None,
    limit_error: type[LimitExceededError] = PayloadTooLargeError,
) -> Dataset:
    if fmt == "csv":
        return parse_csv(
            content,
            name=name or f"csv:{source}",
            source=source,
            label_column=label_column,
            label_field=label_field,
            max_rows=max_rows,
            max_features=max_features,
            limit_error=limit_error,
        )
    return parse_npz(
        content,
        name=name or f"npz:{source}",
        source=source,
        max_rows=max_rows,
        max_features=max_features,
        limit_error=limit_error,
    )


def _read_info(upload_id: str, upload_dir: Path) -> DatasetInfo | None:
    if not isinstance(upload_id, str) or not _ID_RE.fullmatch(upload_id):
        return None  # never turns into a path
    meta = upload_dir / f"{upload_id}.json"
    try:
        info = DatasetInfo.model_validate_json(meta.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable upload metadata %s: %s", meta.name, exc)
        return None
    return info if info.id == upload_id else None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
