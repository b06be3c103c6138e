"""Engines for the shared database, schema creation, and the PostgreSQL test fixture's contract."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import pytest
from sqlalchemy import event, inspect, text

from service.db import create_schema, engine_kwargs, is_sqlite, make_engine, reader
from service.db.schema import SCHEMA_VERSION
from tests.support.postgres import require_postgres


def test_sqlite_engine_is_safe_for_several_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'hpo.db'}"
    engine = make_engine(url)  # the folder is created on demand
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    assert (tmp_path / "new" / "dir" / "hpo.db").is_file()
    assert is_sqlite(url) and not is_sqlite("postgresql+psycopg://u@h/db")
    assert engine_kwargs("postgresql+psycopg://u@h/db")["pool_pre_ping"] is True


def test_schema_created_concurrently_once(database_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        engine = make_engine(database_url)  # one engine per "process"
        try:
            barrier.wait()
            create_schema(engine)
        except BaseException as e:
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(database_url)
    assert {"hpo_jobs", "hpo_schema_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as c:
        assert c.execute(text("SELECT version FROM hpo_schema_version")).scalars().all() == [
            SCHEMA_VERSION
        ]
    engine.dispose()


class TestPostgresFixtureContract:
    UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"

    def test_skips_with_the_reason_outside_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match=r"127\.0\.0\.1:1.*unreachable"):
            require_postgres(self.UNREACHABLE)

    def test_fails_loudly_under_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="CI is set"):
            require_postgres(self.UNREACHABLE)


def test_sqlite_reads_through_reader_take_no_lock_and_writes_still_do(tmp_path: Path) -> None:
    """A write transaction begins IMMEDIATE (it queues on the busy timeout instead of failing
    mid-way); a read through ``reader`` begins DEFERRED and, under WAL, does not wait for a
    writer that holds the lock."""
    path = tmp_path / "hpo.db"
    engine = make_engine(f"sqlite:///{path}")
    begins: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("BEGIN"):
            begins.append(statement)

    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER)"))
    assert reader(engine) is reader(engine)  # one per engine, sharing its pool and hooks
    with reader(engine).connect() as c:
        c.execute(text("SELECT COUNT(*) FROM t")).scalar()
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]

    # Another process's writer holds the lock for the whole of the read.
    other = sqlite3.connect(path, isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    try:
        started = time.perf_counter()
        with reader(engine).connect() as c:
            assert c.execute(text("SELECT COUNT(*) FROM t")).scalar() == 0  # the last commit
        assert time.perf_counter() - started < 1.0
    finally:
        other.execute("COMMIT")
        other.close()
    with reader(engine).connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM t")).scalar() == 1
    engine.dispose()
    # The engine's reader refers to it; kept on the engine, it does not keep it alive.
    gone = weakref.ref(engine)
    del engine, c
    gc.collect()
    assert gone() is None
