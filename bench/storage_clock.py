"""How much of a process's training thread goes to storage: a sampling clock.

About every millisecond the clock looks at the main thread's Python stack (as py-spy does) and
charges the time since its previous look to "storage" when some frame on that stack is in
storage code: Optuna's storages, SQLAlchemy, the DB drivers, this project's jobs table and its
direct trial writes (``service.db``, ``service.trial_attrs``, ``service.studies``). That
covers the Python around each query (ORM objects, JSON, Optuna's caches) as well as the
database's own time, which timing SQL statements alone would miss, with no change to the code
measured. Threads other than the main one (heartbeats, the reaper) are not counted: they run
beside training.

How it looks matters. On Linux (``mode == "signal"``) a POSIX timer sends the main thread a
real-time signal at random times, a millisecond apart on average (``bench.thread_timer``),
and the look is the signal's handler, which Python runs in the main thread at its next
bytecode: at once in Python code, and at the end of a C call (a query, a matmul) in the frame
that made the call, the one the tick fell in. Where a tick is charged therefore does not depend
on what the main thread does, and a call's expected charge is its own duration. The gaps are
random (exponential) because a fixed period locks onto a loop of about the same period.

Elsewhere (``mode == "thread"``) a daemon thread looks through ``sys._current_frames``. It
needs the GIL to look, so it tends to look when the main thread releases it, at the start of a
query, and charge the plain Python run since its previous look to that query. While it runs the
GIL switch interval is half its look interval (0.5 ms, not Python's 5 ms), which bounds that.

Measured (tests/bench/test_storage_clock.py's check, and a dev variant of it: 0.7 or 4 ms of
plain Python or of matmuls between two short queries, timed around each): the thread clock
read 0.7-2.0x the queries' own time (12.5x at a 5 ms switch interval), the signal clock
0.65-1.3x, most runs 0.87-0.98x. On the bench's two-process service job the two clocks, run
together in the same processes, read the same within 6% (1.19 / 1.23 s, 1.19 / 1.27 s, 1.44 /
1.44 s), so figures from before the signal clock stand.

``STORAGE_CLOCK_DIR`` in a process's environment, with ``bench/storage_hook`` on its
PYTHONPATH, starts a clock there at start-up that writes its totals to ``<dir>/<pid>.json``
every 50 ms (the benchmark's service workers); the benchmark's in-process contenders start one
directly.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.thread_timer import ThreadTimer

STORAGE_PATHS = (
    f"{os.sep}optuna{os.sep}storages{os.sep}",
    f"{os.sep}sqlalchemy{os.sep}",
    f"{os.sep}sqlite3{os.sep}",
    f"{os.sep}psycopg",  # psycopg (3) and psycopg2
    f"{os.sep}service{os.sep}db{os.sep}",
    f"{os.sep}service{os.sep}trial_attrs.py",
    f"{os.sep}service{os.sep}studies.py",
)
# Wrappers in those folders that run other code: the worker wraps its pruning checks, its
# saving of the best model (evaluation, safetensors) and its tells in ``call_with_retry`` to
# ride out outages. Only what they call that is storage counts (counted before: the pruners'
# arithmetic, the best model's evaluation and file write).
NOT_STORAGE_PATHS = (f"{os.sep}service{os.sep}db{os.sep}retry.py",)
ENV_DIR = "STORAGE_CLOCK_DIR"
# The signal clock's shortest gap between looks.
MIN_GAP_S = 5e-5
# The signal clock's tick: a real-time signal, used by nothing else in the project (the
# worker's stop deadline is SIGALRM).
TICK_SIGNAL: int | None = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else None


@functools.cache
def _is_storage_file(name: str) -> bool:
    return any(p in name for p in STORAGE_PATHS) and not any(p in name for p in NOT_STORAGE_PATHS)


def in_storage(frame: FrameType | None) -> bool:
    while frame is not None:
        if _is_storage_file(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False


class StorageClock:
    """Seconds of the main thread in storage code, and seconds observed, since ``start``.

    ``start`` must be called from the main thread. ``mode`` is "signal" where the per-thread
    timer is available (Linux), else "thread" (see the module doc); ``thread=True`` forces
    the thread clock.
    """

    def __init__(
        self, interval_s: float = 0.001, out: Path | None = None, *, thread: bool = False
    ) -> None:
        self.interval_s = interval_s
        self.out = out
        self.mode = "thread" if thread else "signal"
        self.storage_s = 0.0
        self.observed_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident
        self._switch_s = sys.getswitchinterval()
        self._timer: ThreadTimer | None = None
        self._previous_handler: Any = None
        self._last = self._written = 0.0
        self._gaps = random.Random(0)
        # The first exception in the signal handler, which must not raise: a failed write of
        # the totals, a timer that could not be re-armed (the clock then stops looking).
        self.failure: Exception | None = None

    def start(self) -> StorageClock:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StorageClock.start: call it from the main thread")
        self._last = self._written = time.perf_counter()
        if self.mode == "signal":
            try:
                self._start_timer()
                return self
            except (OSError, AttributeError, ValueError):
                self.mode = "thread"
        self._switch_s = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_s, self.interval_s / 2))  # see the module doc
        self._thread = threading.Thread(target=self._run, name="storage-clock", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        atexit.unregister(self._disarm)
        self._disarm()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            sys.setswitchinterval(self._switch_s)
        try:
            self._write()
        except OSError as e:
            self.failure = self.failure or e
        if self.failure is not None:
            raise RuntimeError(f"storage clock failed: {self.failure!r}") from self.failure

    def _disarm(self) -> None:
        # Also at exit: Python resets its handlers to the default action as it shuts down, and
        # the default action of a real-time signal is to end the process (rc -37).
        if self._timer is not None:
            timer, self._timer = self._timer, None
            timer.delete()
            signal.signal(timer.signo, self._previous_handler)

    def totals(self) -> dict[str, float]:
        return {"storage_s": self.storage_s, "observed_s": self.observed_s}

    def _start_timer(self) -> None:
        if TICK_SIGNAL is None:
            raise OSError("no real-time signals here")
        previous = signal.getsignal(TICK_SIGNAL)
        if previous not in (signal.SIG_DFL, None):
            raise ValueError(f"signal {TICK_SIGNAL} already has a handler")
        timer = ThreadTimer(TICK_SIGNAL)  # OSError off Linux
        self._previous_handler = previous
        signal.signal(TICK_SIGNAL, self._tick)
        signal.siginterrupt(TICK_SIGNAL, False)  # interrupted system calls resume
        self._timer = timer
        atexit.register(self._disarm)
        try:
            self._arm()
        except OSError:
            atexit.unregister(self._disarm)
            self._disarm()
            raise

    def _arm(self) -> None:
        # Exponential gaps (a Poisson process): a fixed period locks onto any loop whose period
        # is near it and samples one phase of it, over and over.
        assert self._timer is not None
        self._timer.arm(max(MIN_GAP_S, self._gaps.expovariate(1 / self.interval_s)))

    def _tick(self, _signum: int, frame: FrameType | None) -> None:
        # Python runs this in the main thread with ``frame`` its current frame: where the tick
        # fell, or the frame whose C call it fell in (see the module doc).
        # An exception here would surface in whatever the main thread was running.
        try:
            self._look(frame, time.perf_counter())
            if self._timer is not None:
                self._arm()
        except Exception as e:  # kept for stop() and read_dir to raise
            self.failure = self.failure or e

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self._main)  # type: ignore[arg-type]
            self._look(frame, time.perf_counter())
            del frame

    def _look(self, frame: FrameType | None, now: float) -> None:
        dt, self._last = now - self._last, now
        self.observed_s += dt
        if in_storage(frame):
            self.storage_s += dt
        if self.out is not None and now - self._written >= 0.05:
            self._write()
            self._written = now

    def _write(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        failure = {} if self.failure is None else {"failure": repr(self.failure)}
        tmp.write_text(json.dumps({**self.totals(), **failure}))
        tmp.replace(self.out)


def start_from_env() -> StorageClock | None:
    """The clock of a process started with STORAGE_CLOCK_DIR set (see bench/storage_hook)."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return None
    return StorageClock(out=Path(folder) / f"{os.getpid()}.json").start()


def read_dir(folder: Path) -> dict[str, float]:
    """The totals of every process clock in ``folder``, summed; RuntimeError if one failed."""
    total = {"storage_s": 0.0, "observed_s": 0.0}
    for f in folder.glob("*.json"):
        try:
            t = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if t.get("failure"):
            raise RuntimeError(f"the storage clock of {f.stem} failed: {t['failure']}")
        for k in total:
            total[k] += float(t.get(k, 0.0))
    return total
