"""Engines for the shared database: SQLite (WAL, busy timeout, BEGIN IMMEDIATE) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from service import defaults


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def engine_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments for create_engine, shared with Optuna's RDBStorage."""
    if is_sqlite(url):
        # The driver's busy timeout makes a writer wait for the lock instead of failing.
        return {
            "connect_args": {"timeout": defaults.SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        }
    # pre-ping: a worker survives a database restart by reconnecting on the next checkout.
    return {"pool_pre_ping": True, "pool_recycle": 300}


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of a SQLite file URL so a first run needs no set-up."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def configure_sqlite(engine: Engine) -> None:
    """Make SQLite safe for several processes: WAL journal and immediate write transactions.

    pysqlite starts transactions lazily and upgrades a read lock to a write lock mid-transaction;
    two processes doing that at once get "database is locked" without waiting for the busy timeout.
    Taking the write lock at BEGIN (IMMEDIATE) makes writers queue on the busy timeout instead.
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(defaults.SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints only
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    ensure_sqlite_dir(url)
    engine = create_engine(url, **engine_kwargs(url))
    configure_sqlite(engine)
    return engine
