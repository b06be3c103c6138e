"""``StopFlag``: a stop request that a signal handler can raise without deadlocking.

A Python signal handler runs in the main thread between two bytecodes, so it must not take a
lock the main thread may be holding. ``threading.Event.set`` takes the event's lock, and
``Event.wait`` holds that same lock around its wait: a SIGTERM landing there deadlocks the
worker in its own handler until SIGKILL. Seen in CI (an idle worker logged SIGTERM, then hung
for the whole stop grace) and reproduced: a process looping on ``Event.wait(0)`` hung in 129
of 200 SIGTERMs whose handler called ``set``. Here ``set`` writes a flag and one byte to a
pipe, which takes no lock, and ``wait`` is ``select`` on the pipe.
"""

from __future__ import annotations

import contextlib
import os
import select


class StopFlag:
    """Set once, never cleared; ``wait``, ``is_set`` and ``set`` from any thread or a signal
    handler (the subset of ``threading.Event`` the worker uses)."""

    def __init__(self) -> None:
        self._set = False
        r, w = os.pipe()
        os.set_blocking(w, False)
        # Unbuffered file objects: their descriptors close with them.
        self._reader = open(r, "rb", buffering=0)  # noqa: SIM115
        self._writer = open(w, "wb", buffering=0)  # noqa: SIM115

    def set(self) -> None:
        self._set = True
        # One byte wakes every wait (a full pipe has woken them already); ValueError: the pipe
        # was closed at interpreter exit.
        with contextlib.suppress(BlockingIOError, ValueError):
            self._writer.write(b"x")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Until set or ``timeout`` seconds pass (None: no limit); whether it is set."""
        if not self._set:
            # The byte is never read back: once set, every later wait returns at once.
            select.select([self._reader], [], [], timeout)
        return self._set
