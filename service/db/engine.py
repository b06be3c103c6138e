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


# Execution option of connections whose transactions only read (``reader``).
READ_ONLY_OPTION = "hpo_read_only"
# Where an engine keeps its reader: an attribute, not a weak dictionary, whose values (which
# refer to their engine) would keep every engine alive.
_READER_ATTR = "_hpo_reader"


def reader(engine: Engine) -> Engine:
    """``engine`` for transactions that only read (the same pool and hooks).

    On SQLite they begin DEFERRED rather than IMMEDIATE (``configure_sqlite``): under WAL a
    reader takes no lock, so it neither waits for writers nor holds them up. With IMMEDIATE every
    read queued for the database's one write lock, and SQLite's busy handler sleeps 1, 2, 5,
    10 ms... between tries: with two processes committing in a loop, 300 reads of one row took
    up to 11 s each through the plain engine, at most 0.9 ms through this one. (In the bench's
    two-process service job reads took 1.3-2.6 ms on average either way: there the processes
    compete for the CPU, not for the lock.) A transaction through it that writes anyway still
    works, with pysqlite's old risk of "database is locked" when another process writes at the
    same time.
    """
    found: Engine | None = engine.__dict__.get(_READER_ATTR)
    if found is None:
        found = engine.execution_options(**{READ_ONLY_OPTION: True})
        engine.__dict__[_READER_ATTR] = found
    return found


def configure_sqlite(engine: Engine) -> None:
    """Make SQLite safe for several processes: WAL journal and immediate write transactions.

    pysqlite starts transactions lazily and upgrades a read lock to a write lock mid-transaction;
    two processes doing that at once get "database is locked" without waiting for the busy timeout.
    Taking the write lock at BEGIN (IMMEDIATE) makes writers queue on the busy timeout instead.
    Transactions through ``reader(engine)`` only read and begin DEFERRED: no lock under WAL.
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
        if conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    ensure_sqlite_dir(url)
    engine = create_engine(url, **engine_kwargs(url))
    configure_sqlite(engine)
    return engine
