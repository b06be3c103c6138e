"""Wake the API's long polls when the SQLite database changes, instead of at their next look.

A client following a job (``GET /jobs/{id}`` with ``Prefer: wait``) is answered when the job's
row changes; the server looked at the row every 0.1 s, so a finished job reached its client
0.05 s late on average, plus the time to build the answer. One task per server watches SQLite's
``PRAGMA data_version`` (``service.db.watch.CommitWatch``: microseconds a look) every 10 ms
while some request waits, and wakes the waiters on any commit by another connection; each then
reads its job's row as before. PostgreSQL has no such counter: there the waiters look every
0.1 s as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import Engine

from service.db.watch import CommitWatch

log = logging.getLogger(__name__)

TICK_S = 0.01  # how often data_version is read while a request waits
RETRY_S = 1.0  # after the database failed a look (a replaced file, an outage)


class CommitSignal:
    """``wait(timeout)`` returns at the next commit to the database by another connection, or
    after ``timeout`` (always after ``timeout`` where the database cannot tell: PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.watches = engine.dialect.name == "sqlite"
        self._commit = asyncio.Event()  # replaced by a fresh one at each commit
        self._waiting = 0
        self._someone_waits = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.watches:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, timeout: float) -> bool:
        """True when woken by a commit, False after ``timeout``."""
        if not self.watches:
            await asyncio.sleep(timeout)
            return False
        commit = self._commit
        self._waiting += 1
        self._someone_waits.set()
        try:
            await asyncio.wait_for(commit.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _watch(self) -> None:
        # On the event loop's thread throughout: a CommitWatch stays on one thread, and a
        # look is a few microseconds of SQLite, no lock taken.
        watch: CommitWatch | None = None
        try:
            while True:
                if not self._waiting:
                    self._someone_waits.clear()
                    await self._someone_waits.wait()
                try:
                    if watch is None:
                        watch = CommitWatch(self._engine)
                    elif watch.changed():
                        commit, self._commit = self._commit, asyncio.Event()
                        commit.set()
                except Exception as e:  # the waiters still wake at their timeouts
                    log.debug("commit watch failed (%s); retrying in %g s", e, RETRY_S)
                    if watch is not None:
                        watch.close()
                    watch = None
                    await asyncio.sleep(RETRY_S)
                    continue
                await asyncio.sleep(TICK_S)
        finally:
            if watch is not None:
                watch.close()
