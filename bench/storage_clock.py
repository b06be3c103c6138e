"""How much of a process's training thread goes to storage: a sampling clock.

A daemon thread looks at the main thread's Python stack every millisecond (as py-spy does, from
inside) and charges the time since its previous look to "storage" when some frame on that stack
is in storage code: Optuna's storages, SQLAlchemy, the DB drivers, this project's jobs table and
its direct trial writes (``service.db``, ``service.trial_attrs``, ``service.studies``). That
covers the Python around each query (ORM objects, JSON, Optuna's caches) as well as the
database's own time, which timing SQL statements alone would miss, with no change to the code
measured. Each look is weighted by the time since the previous one, so a stretch in which the
main thread held the GIL (the sampler then waits for it) is charged to where the main thread
was when it let go. Threads other than the main one (heartbeats, the reaper) are not counted:
they run beside training.

While it runs, the process's GIL switch interval is at most half the look interval (0.5 ms,
not Python's 5 ms). The clock's thread needs the GIL to look; with 5 ms it got it only when the
main thread released it, at its next query or torch op, and each such look charged the Python
that had run since the previous one to that call. Main-thread stretches of plain Python shorter
than the switch interval, each followed by a query, were then counted as storage: 12.5x the
storage time measured with a timer around each query, in a synthetic check (1.4-2.1x at
0.5 ms, the rest being the up to 1 ms before each look; tests/bench/test_storage_clock.py). The bench's own runs were not affected measurably: the
population contender's storage read 443-461 ms at 5 ms and 465-478 ms at 0.5 ms.

``STORAGE_CLOCK_DIR`` in a process's environment, with ``bench/storage_hook`` on its
PYTHONPATH, starts a clock there at start-up that writes its totals to ``<dir>/<pid>.json``
every 50 ms (the benchmark's service workers); the benchmark's in-process contenders start one
directly.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType

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


def in_storage(frame: FrameType | None) -> bool:
    while frame is not None:
        name = frame.f_code.co_filename
        if any(p in name for p in STORAGE_PATHS) and not any(p in name for p in NOT_STORAGE_PATHS):
            return True
        frame = frame.f_back
    return False


class StorageClock:
    """Seconds of the main thread in storage code, and seconds observed, since ``start``."""

    def __init__(self, interval_s: float = 0.001, out: Path | None = None) -> None:
        self.interval_s = interval_s
        self.out = out
        self.storage_s = 0.0
        self.observed_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-clock", daemon=True)
        self._main = threading.main_thread().ident
        self._switch_s = sys.getswitchinterval()

    def start(self) -> StorageClock:
        self._switch_s = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_s, self.interval_s / 2))  # see the module doc
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch_s)
        self._write()

    def totals(self) -> dict[str, float]:
        return {"storage_s": self.storage_s, "observed_s": self.observed_s}

    def _run(self) -> None:
        last = written = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self._main)  # type: ignore[arg-type]
            now = time.perf_counter()
            dt, last = now - last, now
            self.observed_s += dt
            if in_storage(frame):
                self.storage_s += dt
            del frame
            if self.out is not None and now - written >= 0.05:
                self._write()
                written = now

    def _write(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.totals()))
        tmp.replace(self.out)


def start_from_env() -> StorageClock | None:
    """The clock of a process started with STORAGE_CLOCK_DIR set (see bench/storage_hook)."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return None
    return StorageClock(out=Path(folder) / f"{os.getpid()}.json").start()


def read_dir(folder: Path) -> dict[str, float]:
    """The totals of every process clock in ``folder``, summed."""
    total = {"storage_s": 0.0, "observed_s": 0.0}
    for f in folder.glob("*.json"):
        try:
            t = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k in total:
            total[k] += float(t.get(k, 0.0))
    return total
