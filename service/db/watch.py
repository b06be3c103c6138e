"""Wake an idle worker when the shared database changes, instead of at its next poll."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import Engine


class CommitWatch:
    """Whether another connection committed to a SQLite database since the last look.

    SQLite's ``PRAGMA data_version``, read on one held connection, changes whenever any other
    connection (any process) commits, and costs microseconds: an idle worker can look every
    few milliseconds and query for runnable jobs as soon as something was written (a job
    submitted, a trial finished elsewhere) instead of at its poll interval, whose wait was most
    of a submitted job's time to its first trial. PostgreSQL has no such counter: workers on
    it poll.

    Use it from one thread (the worker's loop): the engine lets connections cross threads, the
    watch does not. ``changed`` raises what the database raises; the caller then closes the
    watch and makes a new one once the database answers again (a replaced file, an outage).
    """

    def __init__(self, engine: Engine) -> None:
        self._conn: Any = engine.raw_connection()
        try:
            self._version = self._read()
        except BaseException:
            self.close()
            raise

    def changed(self) -> bool:
        """True once per change: another connection committed since the previous call."""
        version = self._read()
        if version == self._version:
            return False
        self._version = version
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a connection to a database that went away
            self._conn.close()

    def _read(self) -> int:
        cur = self._conn.cursor()
        try:
            cur.execute("PRAGMA data_version")
            return int(cur.fetchone()[0])
        finally:
            cur.close()


__all__ = ["CommitWatch"]
