"""/datasets: built-in datasets and the owner's uploads (validated, stored under server-side ids)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, UploadFile, status

from service.api.deps import OwnerDep, SettingsDep
from service.errors import DatasetError, PayloadTooLargeError

router = APIRouter(prefix="/datasets", tags=["datasets"])

_CHUNK = 1 << 20


@router.get("")
def list_datasets(settings: SettingsDep, owner: OwnerDep) -> dict[str, Any]:
    from service.datasets import BUILTIN_DATASETS, list_uploads

    uploads = list_uploads(settings.upload_dir_for(owner))
    return {"builtin": BUILTIN_DATASETS, "uploads": [u.model_dump(mode="json") for u in uploads]}


@router.post("", status_code=status.HTTP_201_CREATED)
async def upload_dataset(
    request: Request,
    file: UploadFile,
    settings: SettingsDep,
    owner: OwnerDep,
    label_column: str = "label",
) -> dict[str, Any]:
    """Upload a CSV (numeric features + a label column) or an NPZ (arrays X, y). The size cap is
    measured against the bytes actually received, not the Content-Length header."""
    from service.datasets import store_upload

    limit = settings.max_upload_bytes
    chunks: list[bytes] = []
    received = 0
    while chunk := await file.read(_CHUNK):
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(
                f"upload exceeds the limit of {limit:,} bytes (received more than {limit:,})",
                field="file",
            )
        chunks.append(chunk)
    if received == 0:
        raise DatasetError("the uploaded file is empty", field="file")
    info = store_upload(
        b"".join(chunks),
        file.filename or "upload",
        settings.upload_dir_for(owner),
        max_rows=settings.max_dataset_rows,
        max_features=settings.max_dataset_features,
        label_column=label_column,
    )
    return {"name": "upload", **info.model_dump(mode="json")}


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, settings: SettingsDep, owner: OwnerDep) -> dict[str, Any]:
    from service.datasets import BUILTIN_DATASETS, get_upload_info

    for b in BUILTIN_DATASETS:
        if b["name"] == dataset_id:
            return {"builtin": True, **b}
    return get_upload_info(dataset_id, settings.upload_dir_for(owner)).model_dump(mode="json")
