"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

import optuna
from fastapi import Depends, Header, Request

from service.api.security import owner_for
from service.config import Settings
from service.db import JobStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs  # type: ignore[no-any-return]


def get_storage(request: Request) -> optuna.storages.BaseStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_owner(
    request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> str:
    return owner_for(authorization, request.app.state.settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
StorageDep = Annotated[optuna.storages.BaseStorage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(get_owner)]
