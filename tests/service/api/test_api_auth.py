"""Bearer tokens: 401 without one, and one owner never sees another owner's jobs (404)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.api.security import UnsafeBindError, check_bind_allowed
from service.config import Settings
from tests.support.api import assert_problem, submit

ALICE = {"Authorization": "Bearer a-secret"}
BOB = {"Authorization": "Bearer b-secret"}


@pytest.fixture
def authed(settings: Settings, make_client: Callable[[Settings], TestClient]) -> TestClient:
    return make_client(settings.model_copy(update={"api_tokens": "alice:a-secret,bob:b-secret"}))


def test_missing_or_wrong_token_is_401(authed: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a-secret"}):
        r = authed.get("/jobs", headers=headers)
        assert_problem(r, 401, "Authorization")
        assert r.headers["www-authenticate"] == "Bearer"
    assert authed.get("/healthz").status_code == 200  # probes need no token


def test_owners_are_isolated(authed: TestClient) -> None:
    job = submit(authed, headers=ALICE)
    assert job["owner"] == "alice"
    assert authed.get(f"/jobs/{job['id']}", headers=ALICE).status_code == 200
    assert_problem(authed.get(f"/jobs/{job['id']}", headers=BOB), 404)
    assert_problem(authed.post(f"/jobs/{job['id']}/cancel", headers=BOB), 404)
    assert authed.get("/jobs", headers=BOB).json()["items"] == []
    # idempotency keys are per owner too
    h = {"Idempotency-Key": "k"}
    a = authed.post("/jobs", json={"name": "x", "n_trials": 1}, headers=ALICE | h).json()
    b = authed.post("/jobs", json={"name": "x", "n_trials": 1}, headers=BOB | h).json()
    assert a["id"] != b["id"]


@pytest.mark.parametrize(
    ("host", "tokens", "ok"),
    [
        ("127.0.0.1", "", True),
        ("localhost", "", True),
        ("::1", "", True),
        ("0.0.0.0", "", False),
        ("0.0.0.0", "alice:x", True),
    ],
)
def test_open_server_only_on_loopback(host: str, tokens: str, ok: bool) -> None:
    s = Settings(host=host, api_tokens=tokens)
    if ok:
        check_bind_allowed(s)
    else:
        with pytest.raises(UnsafeBindError, match="HPO_API_TOKENS"):
            check_bind_allowed(s)
