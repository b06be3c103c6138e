"""bench.storage_clock: the training thread's time in storage code, sampled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bench.storage_clock import ENV_DIR, StorageClock, read_dir

REPO = Path(__file__).resolve().parents[2]


def _queries_for(seconds: float, url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as c:
        c.execute(text("create table if not exists t (x integer)"))
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            c.execute(text("insert into t values (1)"))
            c.execute(text("select count(*) from t")).scalar()
    engine.dispose()


def _python_for(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += sum(range(100))
    return n


def test_time_in_sqlalchemy_counts_as_storage_and_plain_python_does_not(tmp_path: Path) -> None:
    clock = StorageClock().start()
    _queries_for(0.4, f"sqlite:///{tmp_path / 'a.db'}")
    middle = clock.totals()
    _python_for(0.4)
    time.sleep(0.2)  # off the CPU: observed, not storage
    clock.stop()
    end = clock.totals()
    # About 0.4 s in queries, then 0.6 s elsewhere; bounds loose for a loaded CI machine.
    assert middle["storage_s"] > 0.25, middle
    assert end["storage_s"] - middle["storage_s"] < 0.1, (middle, end)
    assert 0.8 < end["observed_s"] < 2.5, end


def _queries_between_python(tmp_path: Path, clock: StorageClock) -> float:
    """Stretches of plain Python shorter than Python's GIL switch interval (5 ms), each followed
    by two short queries, under ``clock``; the queries' own time, timed around each."""
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    in_queries = 0.0
    with engine.connect() as c:
        c.execute(text("create table t (x integer)"))
        clock.start()
        for _ in range(150):
            _python_for(0.004)
            started = time.perf_counter()
            c.execute(text("insert into t values (1)"))
            c.execute(text("select count(*) from t")).scalar()
            in_queries += time.perf_counter() - started
        clock.stop()
    engine.dispose()
    # about 0.6 s of Python and a fraction of that in queries; loose for a loaded CI machine
    assert in_queries < 0.3, in_queries
    assert clock.observed_s > 0.5, clock.observed_s
    return in_queries


def test_the_signal_clock_charges_queries_their_own_time(tmp_path: Path) -> None:
    """The tick falls where the main thread is; a query is charged about its duration (0.65-1.3x
    in the checks made, most 0.87-0.98x; the bounds allow for ~100 samples' noise and a loaded
    CI machine)."""
    clock = StorageClock()
    in_queries = _queries_between_python(tmp_path, clock)
    assert clock.mode == "signal"  # Linux
    assert 0.4 * in_queries < clock.storage_s < 2 * in_queries, (clock.storage_s, in_queries)
    assert signal.getsignal(signal.SIGRTMIN + 3) == signal.SIG_DFL  # handler given back


def test_the_thread_clock_charges_python_before_a_query_to_it_at_most_4x(tmp_path: Path) -> None:
    """The fallback clock looks when the main thread releases the GIL, at the start of a query,
    and charges the Python before it to the query; its shorter switch interval bounds that
    (12.5x the queries' own time at Python's 5 ms)."""
    switch = sys.getswitchinterval()
    clock = StorageClock(thread=True)
    in_queries = _queries_between_python(tmp_path, clock)
    assert clock.mode == "thread"
    assert sys.getswitchinterval() == switch  # given back
    assert clock.storage_s < max(4 * in_queries, 0.1), (clock.storage_s, in_queries)


def test_a_failure_in_the_signal_handler_is_kept_and_raised_not_thrown_into_the_code(
    tmp_path: Path,
) -> None:
    """The handler runs inside whatever the main thread was doing: it must not raise there."""
    out = tmp_path / "gone" / "1.json"  # its folder does not exist: every write fails
    clock = StorageClock(out=out).start()
    _python_for(0.2)  # the first write is due after 50 ms
    assert isinstance(clock.failure, FileNotFoundError)
    with pytest.raises(RuntimeError, match="storage clock failed"):
        clock.stop()


def test_a_process_clock_that_failed_stops_the_reading(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text(json.dumps({"storage_s": 1.0, "observed_s": 2.0}))
    (tmp_path / "2.json").write_text(
        json.dumps({"storage_s": 0.5, "observed_s": 2.0, "failure": "OSError('timer')"})
    )
    with pytest.raises(RuntimeError, match="storage clock of 2 failed: OSError"):
        read_dir(tmp_path)


def test_code_run_through_the_retry_wrapper_counts_only_where_it_is_storage(
    tmp_path: Path,
) -> None:
    """The worker wraps pruning checks, saving the best model and tells in call_with_retry
    (service/db/retry.py); the wrapper is not storage, the queries under it are."""
    from service.db.retry import call_with_retry

    clock = StorageClock().start()
    call_with_retry(lambda: _python_for(0.4), deadline_s=0, what="arithmetic")
    middle = clock.totals()
    call_with_retry(
        lambda: _queries_for(0.4, f"sqlite:///{tmp_path / 'a.db'}"), deadline_s=0, what="queries"
    )
    clock.stop()
    end = clock.totals()
    assert middle["storage_s"] < 0.1, middle
    assert end["storage_s"] - middle["storage_s"] > 0.25, (middle, end)


def test_a_process_started_with_the_hook_writes_its_totals(tmp_path: Path) -> None:
    """What the benchmark's service workers run: Python starts the clock from the hook folder."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "bench" / "storage_hook"),
        ENV_DIR: str(tmp_path),
        "STORAGE_CLOCK_REPO": str(REPO),
    }
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from tests.bench.test_storage_clock import _queries_for;"
        "_queries_for(0.4, sys.argv[2]); time.sleep(0.15)"
    )
    url = f"sqlite:///{tmp_path / 'b.db'}"
    subprocess.run([sys.executable, "-c", code, str(REPO), url], env=env, check=True, timeout=60)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    totals = read_dir(tmp_path)
    assert totals == json.loads(files[0].read_text())
    assert 0.25 < totals["storage_s"] <= totals["observed_s"], totals
