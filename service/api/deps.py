"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

import optuna
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.security import owner_for
from service.config import Settings
from service.db import JobStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs  # type: ignore[no-any-return]


def get_storage(request: Request) -> optuna.storages.BaseStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


# Documents the scheme in OpenAPI (clients and fuzzers send the token); the check is owner_for.
_bearer = HTTPBearer(
    auto_error=False,
    description="Set when the server has HPO_API_TOKENS: `Authorization: Bearer <token>`.",
)


def get_owner(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> str:
    return owner_for(request.headers.get("authorization"), request.app.state.settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
StorageDep = Annotated[optuna.storages.BaseStorage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(get_owner)]
