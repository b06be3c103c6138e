"""The compose services, run as local processes from their own command and environment.

No container engine here, so this is the closest proof that `docker compose up` works: the
``api``, ``worker`` and ``dashboard`` commands and environment are read from docker-compose.yml,
the volume target /data is mapped to a temporary folder and each container port to a free local
port; a job goes in through the api, the worker runs it, the dashboard shows its study.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.compose_local import TOKEN, LocalService, compose_config, local_service
from tests.support.procs import HpoProcess, wait_until
from worker.cpus import available_cpus

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "name": "compose-smoke",
    "dataset": {"name": "digits"},
    "model": {"hidden_layers": [32]},
    "search_space": "default",
    "n_trials": 3,
    "training": {"max_epochs": 2},
    "pruner": {"type": "none"},
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> str | None:
    """sqlite: the file's default; postgres: HPO_DATABASE_URL set, as the profile's docs say
    (a fresh database on the local server stands in for the compose `postgres` service)."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def _services(
    tmp_path: Path, compose_env: dict[str, str], database: str | None = None
) -> dict[str, LocalService]:
    env = {**compose_env, **({"HPO_DATABASE_URL": database} if database else {})}
    config = compose_config(env, ("postgres",) if database else ())
    data = tmp_path / "volume"
    data.mkdir()
    return {name: local_service(config, name, data) for name in ("api", "worker", "dashboard")}


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[HpoProcess]]:
    procs: list[HpoProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def _healthy(svc: LocalService, proc: HpoProcess, timeout: float = 60) -> None:
    """Run the service's own healthcheck command until it passes, as Compose would."""

    def check() -> bool:
        assert proc.alive(), f"{svc.name} exited:\n{proc.log_tail()}"
        return svc.run_healthcheck().returncode == 0

    wait_until(
        check, timeout, interval=0.5, what=f"{svc.name} healthcheck", diagnostics=proc.log_tail
    )


def test_api_worker_dashboard(
    compose_env: dict[str, str], database: str | None, started: list[HpoProcess], tmp_path: Path
) -> None:
    services = _services(tmp_path, compose_env, database)
    api, worker, dashboard = services["api"], services["worker"], services["dashboard"]
    if database:
        assert api.env["HPO_DATABASE_URL"] == database
    assert api.command[api.command.index("--host") + 1] == "0.0.0.0"  # as in the container

    # depends_on order: api healthy first, then worker and dashboard.
    api_proc = api.start(tmp_path)
    started.append(api_proc)
    _healthy(api, api_proc)
    started.append(worker_proc := worker.start(tmp_path))
    started.append(dash_proc := dashboard.start(tmp_path))

    base = api.url("8000")
    assert httpx.get(f"{base}/jobs", timeout=10).status_code == 401  # tokens are enforced
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        r = http.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["owner"] == "ci"

        def finished() -> dict[str, Any] | None:
            assert worker_proc.alive(), f"worker exited:\n{worker_proc.log_tail()}"
            j = http.get(f"/jobs/{job['id']}").json()
            return j if j["state"] in {"succeeded", "failed", "cancelled"} else None

        final = wait_until(
            finished, 120, what="the job to finish", diagnostics=worker_proc.log_tail
        )
        assert final["state"] == "succeeded", final
        assert final["trial_counts"]["complete"] == 3
        best = http.get(f"/jobs/{job['id']}/best").json()
        assert 0 < best["value"] <= 1

    _healthy(dashboard, dash_proc)
    studies = httpx.get(f"{dashboard.url('8080')}/api/studies", timeout=10).json()
    by_name = {s["study_name"]: s for s in studies["study_summaries"]}
    assert job["study_name"] in by_name
    assert by_name[job["study_name"]]["directions"] == ["maximize"]

    # Everything the services wrote went to the mapped volume (or the database server).
    data = Path(api.env["HPO_DATA_ROOT"])
    assert any((data / "artifacts").iterdir()), "the worker saved no model into the volume"
    assert (data / "hpo.db").is_file() == (database is None)

    # HPO_WORKER_PROCESSES=auto: one worker process per CPU under a supervisor (one CPU: none)
    supervised = "worker supervisor: " in worker_proc.log_tail(100_000)
    assert supervised == (available_cpus() > 1), worker_proc.log_tail()

    # docker compose stop: SIGTERM, and the worker exits cleanly within its grace period.
    start = time.monotonic()
    assert worker_proc.stop(grace=float(worker.env["HPO_STOP_GRACE_S"])) == 0
    assert time.monotonic() - start < float(worker.env["HPO_STOP_GRACE_S"])


def test_the_api_refuses_to_start_without_tokens(
    compose_env: dict[str, str], tmp_path: Path
) -> None:
    """Why the compose file must set HPO_API_TOKENS: without them, 0.0.0.0 is refused."""
    api = _services(tmp_path, compose_env)["api"]
    api.env.pop("HPO_API_TOKENS")
    proc = api.start(tmp_path)
    try:
        code = proc.proc.wait(60)
    finally:
        proc.stop()
    assert code == 2
    assert "refusing to bind '0.0.0.0' without authentication" in proc.log_tail()
