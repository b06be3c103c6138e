"""service.api.commit_signal: long polls wake at another connection's commit (SQLite), on real
databases, and a job's follower hears of a change without waiting for the row check."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.api.commit_signal import CommitSignal
from service.api.routes import jobs as job_routes
from service.db import make_engine
from service.states import JobState
from tests.support.specs import random_spec


def _commit_later(url: str, after_s: float) -> threading.Timer:
    """A commit by another connection (another engine, as another process would)."""

    def commit() -> None:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS touched (x INTEGER)"))
            conn.execute(text("INSERT INTO touched VALUES (1)"))
        engine.dispose()

    timer = threading.Timer(after_s, commit)
    timer.start()
    return timer


async def _wait(url: str, timeout: float, commit_after_s: float | None) -> tuple[bool, float]:
    engine = make_engine(url)
    signal = CommitSignal(engine)
    signal.start()
    await asyncio.sleep(0.05)  # let the watch task start
    timer = None if commit_after_s is None else _commit_later(url, commit_after_s)
    start = time.monotonic()
    try:
        woke = await signal.wait(timeout)
        return woke, time.monotonic() - start
    finally:
        if timer is not None:
            timer.join()
        await signal.stop()
        engine.dispose()


def test_a_waiter_wakes_at_another_connections_commit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    make_engine(url).dispose()
    woke, took = asyncio.run(_wait(url, timeout=10, commit_after_s=0.3))
    assert woke and 0.25 < took < 3.0, took  # at the commit, not at the timeout
    woke, took = asyncio.run(_wait(url, timeout=0.5, commit_after_s=None))
    assert not woke and 0.45 < took < 3.0, took


@pytest.mark.postgres
def test_on_postgresql_a_waiter_sleeps_its_timeout(pg_url: str) -> None:
    woke, took = asyncio.run(_wait(pg_url, timeout=0.5, commit_after_s=0.1))
    assert not woke and 0.45 < took < 3.0, took


def test_a_follower_hears_of_a_change_at_the_commit_not_at_the_row_check(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the row looked at only every 30 s, a change 0.5 s into the wait is answered at once
    # only because the commit woke the request.
    monkeypatch.setattr(job_routes, "_ROW_CHECK_S", 30.0)
    job_id = client.post("/jobs", json=random_spec(n_trials=3)).json()["id"]
    etag = client.get(f"/jobs/{job_id}").headers["etag"]
    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    timer = threading.Timer(0.5, jobs.try_transition, args=(job_id, JobState.CANCELLED))
    timer.start()
    start = time.monotonic()
    r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag, "Prefer": "wait=10"})
    took = time.monotonic() - start
    timer.join()
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert 0.4 < took < 5.0, took
