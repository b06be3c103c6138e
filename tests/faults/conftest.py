"""Fixtures for the fault tests: an installation (database + data root + processes) per test,
on SQLite or on a fresh PostgreSQL database, and the figures each test measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults._harness import FaultEnv
from tests.support.postgres import fresh_database


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Iterator[FaultEnv]:
    env = FaultEnv(tmp_path, f"sqlite:///{tmp_path / 'hpo-data' / 'hpo.db'}")
    yield env
    env.stop_all()
    env.engine.dispose()


@pytest.fixture
def pg_env(tmp_path: Path) -> Iterator[FaultEnv]:
    with fresh_database() as url:
        env = FaultEnv(tmp_path, url)
        try:
            yield env
        finally:
            env.stop_all()
            env.engine.dispose()
            env.storage.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_env(request: pytest.FixtureRequest) -> FaultEnv:
    return request.getfixturevalue("sqlite_env" if request.param == "sqlite" else "pg_env")  # type: ignore[no-any-return]
