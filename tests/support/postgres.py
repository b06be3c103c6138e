"""A uniquely named PostgreSQL database per test, dropped afterwards.

The server is the one on 127.0.0.1:5432 (trust auth); ``HPO_TEST_POSTGRES`` overrides the
maintenance URL. When the server cannot be reached a test needing it is skipped with the reason,
except under CI (env ``CI`` set), where it fails: CI must never pass by silently skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import pytest

ADMIN_URL = os.environ.get("HPO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _connect(url: str = ADMIN_URL):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@cache
def unreachable_reason(url: str = ADMIN_URL) -> str | None:
    """None when the server answers, else why not (checked once per session and URL)."""
    try:
        with _connect(url) as conn:
            conn.execute("SELECT 1")
    except Exception as e:
        return f"PostgreSQL at {url} is unreachable: {type(e).__name__}: {e}".strip()
    return None


def require_postgres(url: str = ADMIN_URL) -> None:
    """Return when the server answers; otherwise fail under CI (env ``CI`` set), else skip."""
    reason = unreachable_reason(url)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so postgres tests fail instead of skipping)")
    pytest.skip(f"{reason}; start it with: pg_ctlcluster <version> main start")


def sqlalchemy_url(dbname: str) -> str:
    """The SQLAlchemy (psycopg 3) URL of ``dbname`` on the admin URL's server."""
    from sqlalchemy.engine import make_url

    u = make_url(ADMIN_URL)
    return str(
        u.set(drivername="postgresql+psycopg", database=dbname).render_as_string(
            hide_password=False
        )
    )


def drop_database(name: str) -> None:
    """Drop ``name`` even while clients are connected (FORCE terminates them; PostgreSQL 13+)."""
    with _connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create ``hpo_test_<random>``, yield its SQLAlchemy URL, drop it afterwards."""
    require_postgres()
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    with _connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy_url(name)
    finally:
        drop_database(name)
