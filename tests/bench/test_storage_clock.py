"""bench.storage_clock: the training thread's time in storage code, sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def test_plain_python_between_queries_is_not_charged_to_them(tmp_path: Path) -> None:
    """Stretches of plain Python shorter than Python's GIL switch interval (5 ms), each
    followed by a query: the clock's thread used to look only when the query released the GIL
    and charged the Python before it to storage (12.5x the queries' own time)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.connect() as c:
        c.execute(text("create table t (x integer)"))
        switch = sys.getswitchinterval()
        clock = StorageClock().start()
        in_queries = 0.0
        for _ in range(150):
            _python_for(0.004)
            started = time.perf_counter()
            c.execute(text("insert into t values (1)"))
            c.execute(text("select count(*) from t")).scalar()
            in_queries += time.perf_counter() - started
        clock.stop()
    engine.dispose()
    assert sys.getswitchinterval() == switch  # given back
    # about 0.6 s of Python and a fraction of that in queries; loose for a loaded CI machine
    assert in_queries < 0.3, in_queries
    assert clock.storage_s < max(4 * in_queries, 0.1), (clock.storage_s, in_queries)
    assert clock.observed_s > 0.5, clock.observed_s


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
