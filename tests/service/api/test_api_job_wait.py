"""GET /jobs/{id} as a long poll: ETag, If-None-Match (304) and ``Prefer: wait=N`` (RFC 7240),
with the job changed by another thread through the real job store while a request waits."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from service.api.routes.jobs import MAX_WAIT_S
from service.states import JobState
from tests.support.specs import random_spec


def _submit(client: TestClient) -> tuple[str, str]:
    job = client.post("/jobs", json=random_spec(n_trials=3)).json()
    r = client.get(f"/jobs/{job['id']}")
    assert r.status_code == 200
    return job["id"], r.headers["etag"]


def _cancel_later(client: TestClient, job_id: str, after_s: float) -> threading.Timer:
    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    timer = threading.Timer(after_s, jobs.try_transition, args=(job_id, JobState.CANCELLED))
    timer.start()
    return timer


def test_an_unchanged_job_answers_304_with_its_etag(client: TestClient) -> None:
    job_id, etag = _submit(client)
    assert etag.startswith('"') and etag.endswith('"')
    r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    assert r.headers["etag"] == etag
    # weak and listed tags match too; another tag gets the full answer
    assert (
        client.get(f"/jobs/{job_id}", headers={"If-None-Match": f'"x", W/{etag}'}).status_code
        == 304
    )
    assert client.get(f"/jobs/{job_id}", headers={"If-None-Match": "*"}).status_code == 304
    other = client.get(f"/jobs/{job_id}", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200 and other.json()["id"] == job_id


def test_a_wait_returns_as_soon_as_the_job_changes(client: TestClient) -> None:
    job_id, etag = _submit(client)
    timer = _cancel_later(client, job_id, 0.5)
    start = time.monotonic()
    r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag, "Prefer": "wait=5"})
    took = time.monotonic() - start
    timer.join()
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    assert r.headers["etag"] != etag
    assert r.headers["preference-applied"] == "wait=5"
    assert 0.4 < took < 2.0, took  # woke on the change, not at the end of the wait


def test_a_wait_without_a_change_ends_in_304_after_the_wait(client: TestClient) -> None:
    job_id, etag = _submit(client)
    start = time.monotonic()
    r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag, "Prefer": "wait=1.5"})
    took = time.monotonic() - start
    assert r.status_code == 304 and r.headers["etag"] == etag
    assert 1.4 < took < 4.0, took


def test_a_long_wait_is_capped_and_a_bad_preference_ignored(client: TestClient) -> None:
    job_id, etag = _submit(client)
    timer = _cancel_later(client, job_id, 0.3)
    r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag, "Prefer": "wait=100000"})
    timer.join()
    assert r.status_code == 200 and r.headers["preference-applied"] == f"wait={MAX_WAIT_S:g}"
    etag = r.headers["etag"]
    for prefer in ("wait=abc", "wait=-3", "wait=nan", "respond-async", ""):
        start = time.monotonic()
        r = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag, "Prefer": prefer})
        assert r.status_code == 304 and time.monotonic() - start < 1.0, prefer
        assert "preference-applied" not in r.headers


def test_without_if_none_match_a_wait_is_not_applied(client: TestClient) -> None:
    job_id, _ = _submit(client)
    start = time.monotonic()
    r = client.get(f"/jobs/{job_id}", headers={"Prefer": "wait=5"})
    assert r.status_code == 200 and time.monotonic() - start < 1.0
    assert "preference-applied" not in r.headers


def test_an_unknown_job_is_404_before_any_wait(client: TestClient) -> None:
    r = client.get("/jobs/nope", headers={"If-None-Match": '"x"', "Prefer": "wait=5"})
    assert r.status_code == 404
