"""Transient database errors, and riding them out for a bounded time.

"Transient" means the database could not be reached or asked us to come back later: the
connection was refused or dropped (a restart, a failover), or SQLite's lock wait ran out. Optuna
wraps every SQLAlchemy error of its storage in ``StorageInternalError``; the cause chain is
walked so both spellings are recognised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from service.errors import StorageUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

INITIAL_BACKOFF_S = 0.2  # first wait after a failed call; doubles up to MAX_BACKOFF_S
MAX_BACKOFF_S = 5.0  # a restarted database is noticed within this long


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or anything in its cause chain) says the database is unavailable."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OperationalError | InterfaceError | StorageUnavailableError):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__ or e.__context__
    return False


def describe(exc: BaseException) -> str:
    """One line for a log: the innermost database message, not a page of SQL."""
    e: BaseException = exc
    while e.__cause__ is not None:
        e = e.__cause__
    orig = getattr(e, "orig", None) or e
    return (
        f"{type(orig).__name__}: {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"
    )


class Backoff:
    """Exponential backoff between attempts; ``reset`` after a success."""

    def __init__(self, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S) -> None:
        self.initial, self.maximum = initial, maximum
        self.delay = initial

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.maximum, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.initial


def call_with_retry(
    fn: Callable[[], T],
    *,
    deadline_s: float,
    what: str,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """Call ``fn``; on a transient database error retry with backoff until ``deadline_s`` has
    passed, then raise the last error. Any other error is raised at once. ``fn`` must be safe to
    repeat (idempotent, or checked by the caller)."""
    start = time.monotonic()
    backoff = Backoff()
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = backoff.next()
            if time.monotonic() - start + delay > deadline_s:
                raise
            log.warning(
                "%s: database unavailable (%s); retrying in %.1fs", what, describe(e), delay
            )
            sleep(delay)
