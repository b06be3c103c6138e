"""/healthz, /readyz (503 when the database is really gone), /metrics."""

from __future__ import annotations

import re
from collections.abc import Callable

import optuna
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.support.api import assert_problem, submit
from tests.support.postgres import drop_database


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_readyz(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.postgres
def test_readyz_is_503_when_the_database_is_dropped(
    pg_url: str, settings: Settings, make_client: Callable[[Settings], TestClient]
) -> None:
    client = make_client(settings.model_copy(update={"database_url": pg_url}))
    assert client.get("/readyz").status_code == 200
    submit(client)
    assert len(client.get("/jobs").json()["items"]) == 1

    drop_database(pg_url.rsplit("/", 1)[1])  # terminates the app's connections too

    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert "database unreachable" in r.json()["detail"]
    # liveness does not depend on the database; data routes answer 503 problem details
    assert client.get("/healthz").status_code == 200
    r = client.get("/jobs")
    assert_problem(r, 503)
    assert r.headers["retry-after"] == "5"


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def test_metrics(client: TestClient) -> None:
    job = submit(client)
    submit(client, name="other")
    study = optuna.load_study(study_name=job["study_name"], storage=client.app.state.storage)  # type: ignore[attr-defined]
    for value in (0.5, 0.7):
        t = study.ask()
        study.tell(t, value)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    client.get("/jobs/nope")

    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in (
        "hpo_jobs",
        "hpo_trials_finished",
        "hpo_trial_duration_seconds",
        "hpo_http_request_duration_seconds",
    ):
        # the text format names a counter family with its _total suffix
        assert re.search(rf"^# TYPE {family}(_total)? ", text, re.M), family
    assert _sample(text, "hpo_jobs", state="queued") == 2
    assert _sample(text, "hpo_jobs", state="running") == 0
    assert _sample(text, "hpo_trials_finished_total", state="complete") == 2
    assert _sample(text, "hpo_trials_finished_total", state="pruned") == 1
    assert _sample(text, "hpo_trials_finished_total", state="fail") == 1
    assert _sample(text, "hpo_trial_duration_seconds_count") == 3  # complete + pruned
    assert _sample(text, "hpo_trial_duration_seconds_bucket", le="+Inf") == 3
    assert (
        _sample(
            text,
            "hpo_http_request_duration_seconds_count",
            method="POST",
            route="/jobs",
            status="201",
        )
        == 2
    )
    assert (
        _sample(
            text,
            "hpo_http_request_duration_seconds_count",
            method="GET",
            route="/jobs/{job_id}",
            status="404",
        )
        == 1
    )
