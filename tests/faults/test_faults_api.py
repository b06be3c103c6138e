"""The API process restarts and the database goes away while workers run.

5. Restarting ``hpo serve`` (SIGKILL mid-request, then SIGTERM) loses nothing: jobs keep running
   and finish, and a client that retries its in-flight POST with the same Idempotency-Key gets
   exactly one job per key.
8. A PostgreSQL server that stops for a few seconds: the API answers 503 (never 500) meanwhile,
   workers ride the outage out or abandon their trial to the reaper, and the job finishes.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from optuna.trial import TrialState

from tests.faults._harness import (
    FaultEnv,
    PrivatePostgres,
    grep_logs,
    mid_epoch,
    slow_spec,
    small_spec,
    stop_procs,
    stopped,
)
from tests.support.procs import free_port

pytestmark = pytest.mark.slow


class Client(threading.Thread):
    """Submits small jobs with Idempotency-Keys and reads them back, until stopped. A request
    that dies with the server is retried with the same key until some server answers it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.connection_errors = 0
        self.keys: dict[str, str] = {}  # idempotency key -> job id it was answered with

    def request(self, c: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
        while True:
            try:
                r = c.request(method, path, **kw)
            except httpx.TransportError:
                self.connection_errors += 1
                time.sleep(0.1)
                continue
            self.statuses[r.status_code] += 1
            return r

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                key = uuid.uuid4().hex
                body = small_spec(f"restart-{i}", n_trials=1)
                r = self.request(c, "POST", "/jobs", json=body, headers={"Idempotency-Key": key})
                if r.status_code in (200, 201):
                    self.keys[key] = r.json()["id"]
                    self.request(c, "GET", f"/jobs/{self.keys[key]}")
                    self.request(c, "GET", f"/jobs/{self.keys[key]}/trials")
                self.request(c, "GET", "/jobs", params={"limit": 5})
                i += 1


def test_api_restart_while_workers_run(sqlite_env: FaultEnv, figure: Callable[[str], None]) -> None:
    env = sqlite_env
    port = free_port()
    api = env.server(port)
    a, b = env.worker("a"), env.worker("b")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        r = c.post("/jobs", json=slow_spec("long", n_trials=4, epochs=3))
        assert r.status_code == 201, r.text
        long_id = r.json()["id"]
    long_job = env.job(long_id)
    env.wait_trial(long_job, mid_epoch(a), 90, "worker a mid-epoch")

    client = Client(api.url)
    client.start()
    time.sleep(1.5)
    api.process.signal(signal.SIGKILL)  # abrupt: whatever was in flight dies with it
    killed = time.monotonic()
    assert stopped(api.process, 10) == -signal.SIGKILL
    api2 = env.server(port)
    down_s = time.monotonic() - killed
    time.sleep(1.5)
    # Graceful restart too: uvicorn drains, then re-raises SIGTERM, so the exit is by signal 15.
    assert api2.process.stop() in (0, -signal.SIGTERM)
    assert "Finished server process" in api2.process.log_tail()
    api3 = env.server(port)
    time.sleep(1.5)
    client.stop.set()
    client.join(60)
    assert not client.is_alive()

    jobs = [env.job(long_id), *(env.job(j) for j in client.keys.values())]
    for job in jobs:
        env.wait_state(job, {"succeeded", "failed", "cancelled"}, 120)
        env.assert_finished_on_budget(job)
    # Exactly one job per idempotency key, and every job row has its study.
    rows = env.jobs.list_jobs(limit=10_000)
    by_key = Counter(j.idempotency_key for j in rows if j.idempotency_key)
    assert set(by_key) == set(client.keys), "a key without an answer, or an answer without a job"
    assert max(by_key.values()) == 1
    for j in rows:
        optuna.load_study(study_name=j.study_name, storage=env.storage)
    assert not [s for s in client.statuses if s >= 500], client.statuses
    assert env.integrity_ok() == "ok"
    assert a.alive() and b.alive()
    with httpx.Client(base_url=api3.url, timeout=30) as c:
        assert c.get(f"/jobs/{long_id}").json()["state"] == "succeeded"
    assert stop_procs([a, b]) == [0, 0]
    figure(
        f"API SIGKILLed mid-traffic and restarted ({down_s:.1f}s to ready), then SIGTERM-restarted; "
        f"{sum(client.statuses.values())} responses {dict(client.statuses)}, "
        f"{client.connection_errors} connection errors retried; {len(client.keys)} keys -> "
        f"{len(client.keys)} jobs, all {len(jobs)} jobs succeeded on budget; integrity ok"
    )


@pytest.mark.postgres
def test_database_goes_away_api_503_workers_reconnect(
    tmp_path: Path, figure: Callable[[str], None]
) -> None:
    pg = PrivatePostgres()
    pg.start()
    try:
        env = FaultEnv(tmp_path / "install", pg.create_database())
        try:
            _database_goes_away(env, pg, figure)
        finally:
            env.stop_all()
            env.engine.dispose()
            env.storage.engine.dispose()
    finally:
        pg.close()


def _database_goes_away(env: FaultEnv, pg: PrivatePostgres, figure: Callable[[str], None]) -> None:
    outage_s = 5.0
    api = env.server()
    job = env.submit(slow_spec("outage", n_trials=4, epochs=3))
    # a gives up on storage after 1 s (its trial is abandoned to the reaper); b rides it out.
    a = env.worker("a", HPO_STORAGE_RETRY_S="1")
    b = env.worker("b")
    env.wait_trial(job, mid_epoch(a), 90, "worker a mid-epoch")
    env.wait_trial(job, mid_epoch(b), 90, "worker b mid-epoch")
    env.engine.dispose()
    env.storage.engine.dispose()

    pg.stop("fast")
    went = time.monotonic()
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=api.url, timeout=10) as c:
        while time.monotonic() - went < outage_s:
            for path in (f"/jobs/{job.id}", f"/jobs/{job.id}/trials", "/jobs"):
                r = c.get(path)
                seen[f"{path.split('/')[-1] or 'jobs'}:{r.status_code}"] += 1
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.headers.get("retry-after")
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
            time.sleep(0.2)
    pg.start()
    back = time.monotonic()
    with httpx.Client(base_url=api.url, timeout=10) as c:
        env.wait(lambda: c.get(f"/jobs/{job.id}").status_code == 200, 30, "API to answer again")
        api_back_s = time.monotonic() - back
    env.wait_state(job, {"succeeded", "failed"}, 180)
    finished_s = time.monotonic() - back
    trials = env.assert_finished_on_budget(job)
    assert a.alive() and b.alive(), env.logs()
    assert not grep_logs([a, b], "Traceback"), env.logs()
    abandoned = grep_logs([a], "abandoned")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # Every failed attempt was re-run with the same parameters.
    for t in failed:
        assert any(u.params == t.params and u.state == TrialState.COMPLETE for u in trials), (
            env.describe(job)
        )
    assert stop_procs([a, b]) == [0, 0]
    figure(
        f"PostgreSQL down {outage_s:.0f}s: API {sum(seen.values())} answers all 503 "
        f"(+/readyz 503, /healthz 200), answering again {api_back_s:.1f}s after restart; "
        f"job finished {finished_s:.1f}s after restart with {job.n_trials}/{job.n_trials} trials; "
        f"{len(abandoned)} trial(s) abandoned by the impatient worker, {len(failed)} attempt(s) "
        "failed and re-run; both workers alive"
    )
