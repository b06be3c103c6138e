"""7. Concurrency soak.

SQLite: 4 workers, the API (submitting and reading) and optuna-dashboard (reading) on one
database file for a bounded time: no "database is locked" reaches a trial or a response, and
``PRAGMA integrity_check`` is ok afterwards.
PostgreSQL: 8 workers and 30 small jobs (random and grid): no job runs more trials than its
budget, no grid point runs twice, nothing is left RUNNING.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from optuna.trial import TrialState

from tests.faults._harness import FINISHED, FaultEnv, grep_logs, small_spec, stop_procs
from tests.support.procs import free_port

pytestmark = pytest.mark.slow

SOAK_S = 15.0  # of mixed load, after every process is up
# Soak tests inject no faults: the default heartbeat timing keeps the reapers' queries few.
QUIET = {"HPO_HEARTBEAT_INTERVAL_S": "2", "HPO_HEARTBEAT_GRACE_S": "10"}


class Load(threading.Thread):
    """Calls ``step`` until stopped; counts status codes and keeps every 5xx body."""

    def __init__(self, step: Callable[[httpx.Client], list[httpx.Response]], url: str) -> None:
        super().__init__(daemon=True)
        self.step, self.url = step, url
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    responses = self.step(c)
                except httpx.TransportError as e:
                    self.errors.append(f"transport: {e!r}")
                    continue
                for r in responses:
                    self.statuses[r.status_code] += 1
                    if r.status_code >= 500 or "locked" in r.text:
                        self.errors.append(f"{r.request.url} {r.status_code} {r.text[:300]}")


def test_sqlite_soak_workers_api_dashboard(
    sqlite_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = sqlite_env
    env.env_extra.update(QUIET, HPO_MAX_ACTIVE_JOBS_PER_OWNER="1000")
    api = env.server()
    dash_port = free_port()
    dash = env.dashboard(dash_port)
    workers = [env.worker(f"w{i}") for i in range(4)]
    dash_url = f"http://127.0.0.1:{dash_port}"
    env.wait(
        lambda: httpx.get(f"{dash_url}/api/meta", timeout=5).status_code == 200, 60, "dashboard"
    )

    submitted: list[str] = []
    counter = iter(range(10**6))

    def submit_and_read(c: httpx.Client) -> list[httpx.Response]:
        i = next(counter)
        spec = (
            small_spec(f"soak-{i}", grid=i % 3 == 0, n_trials=4)
            if i % 3
            else small_spec(f"soak-{i}", grid=True)
        )
        r = c.post("/jobs", json=spec)
        out = [r]
        if r.status_code == 201:
            submitted.append(r.json()["id"])
            out.append(c.get(f"/jobs/{r.json()['id']}"))
        time.sleep(0.3)
        return out

    def read_api(c: httpx.Client) -> list[httpx.Response]:
        out = [c.get("/jobs", params={"limit": 20})]
        if submitted:
            jid = submitted[-1]
            out += [c.get(f"/jobs/{jid}"), c.get(f"/jobs/{jid}/trials")]
        return out

    def read_dashboard(c: httpx.Client) -> list[httpx.Response]:
        r = c.get("/api/studies")
        out = [r]
        if r.status_code == 200 and r.json().get("studies"):
            sid = r.json()["studies"][-1]["study_id"]
            out.append(c.get(f"/api/studies/{sid}", params={"after": 0}))
        return out

    loads = [
        Load(submit_and_read, api.url),
        Load(read_api, api.url),
        Load(read_dashboard, dash_url),
    ]
    for load in loads:
        load.start()
    time.sleep(SOAK_S)
    for load in loads:
        load.stop.set()
    for load in loads:
        load.join(60)

    jobs = [env.job(j) for j in submitted]
    for job in jobs:
        env.wait_state(job, {"succeeded", "failed"}, 180)
        env.assert_finished_on_budget(job)
    locked = grep_logs([api.process, dash, *workers], "database is locked")
    fail_reasons = [
        t.user_attrs.get("fail_reason")
        for job in jobs
        for t in env.trials(job)
        if t.state == TrialState.FAIL
    ]
    for w in workers:
        assert w.alive()
    codes = stop_procs(workers)
    errors = [e for load in loads for e in load.errors]
    assert not errors, errors[:5]
    assert not locked, locked[:5]
    assert not fail_reasons, fail_reasons
    assert codes == [0, 0, 0, 0]
    assert env.integrity_ok() == "ok"
    n_trials = sum(len(env.trials(j)) for j in jobs)
    api_calls = loads[0].statuses + loads[1].statuses
    figure(
        f"SQLite soak {SOAK_S:.0f}s: 4 workers ran {n_trials} trials of {len(jobs)} jobs; "
        f"API {sum(api_calls.values())} responses {dict(api_calls)}, dashboard "
        f"{sum(loads[2].statuses.values())} responses {dict(loads[2].statuses)}; "
        f"'database is locked': 0 in logs, 0 in trials, 0 in responses; integrity_check ok"
    )


@pytest.mark.postgres
def test_postgres_eight_workers_thirty_jobs_no_overshoot_no_duplicate_grid_point(
    pg_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = pg_env
    env.env_extra.update(QUIET)
    jobs = [
        env.submit(small_spec(f"pg-{i}", grid=True) if i % 3 == 0 else small_spec(f"pg-{i}"))
        for i in range(30)
    ]
    started = time.monotonic()
    workers = [env.worker(f"w{i}") for i in range(8)]
    for job in jobs:
        env.wait_state(job, {"succeeded", "failed"}, 240)
    took = time.monotonic() - started
    total = 0
    for job in jobs:
        trials = env.trials(job)
        total += len(trials)
        done = [t for t in trials if t.state in FINISHED]
        j = env.job(job.id)
        # No overshoot: not one trial beyond the budget was ever asked.
        assert len(trials) == len(done) == j.n_trials == j.finished, env.describe(job)
        spec: dict[str, Any] = json.loads(j.spec_json)
        if spec["sampler"]["type"] == "grid":
            points = [json.dumps(t.system_attrs["hpo_grid_point"], sort_keys=True) for t in done]
            assert len(set(points)) == len(points) == j.n_trials, env.describe(job)
    codes = stop_procs(workers)
    assert codes == [0] * 8
    assert not grep_logs(workers, "Traceback")
    figure(
        f"PostgreSQL: 8 workers, 30 jobs ({sum(1 for i in range(30) if i % 3 == 0)} grid), "
        f"{total} trials = sum of budgets, 0 overshoot, 0 duplicate grid points, "
        f"done in {took:.0f}s"
    )
