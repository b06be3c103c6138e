"""Who gets in: bearer tokens on every endpoint but the probes, resources per owner, no open
server on a public address, the dashboard published on loopback only."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from starlette.routing import Route

from service.config import Settings
from tests.security.conftest import ALICE, BOB
from tests.support.api import assert_problem
from tests.support.procs import free_port, hpo_env, run_hpo

REPO = Path(__file__).resolve().parents[2]
PROBES = {"/healthz", "/readyz"}
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer "},
    {"Authorization": "bearer"},
    {"Authorization": "Basic YWxpY2U6YWxpY2UtdG9rZW4="},
    {"Authorization": ALICE["Authorization"] + "x"},
    {"Authorization": ALICE["Authorization"][:-1]},
]


def _endpoints(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document, plus the other routes (the document itself
    and the docs pages)."""
    app = client.app
    out = [
        (method.upper(), re.sub(r"\{[^}]+\}", "0123abcd", path))
        for path, item in app.openapi()["paths"].items()  # type: ignore[attr-defined]
        for method in item
    ]
    for route in app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route) and not getattr(route, "include_in_schema", True):
            out += [(m, route.path) for m in sorted((route.methods or set()) - {"HEAD"})]
    return sorted(set(out))


def test_every_endpoint_but_the_probes_answers_401_without_a_valid_token(
    client: TestClient, figure: Callable[[str], None]
) -> None:
    endpoints = _endpoints(client)
    assert len(endpoints) >= 20  # the API routes plus /openapi.json and the docs pages
    checked = 0
    for method, path in [*endpoints, ("GET", "/no-such-path"), ("POST", "/")]:
        for headers in BAD_CREDENTIALS:
            r = client.request(method, path, headers=headers)
            if path in PROBES:
                assert r.status_code == 200, (method, path, r.text)
                continue
            assert_problem(r, 401, "Authorization")
            assert r.headers["www-authenticate"] == "Bearer", (method, path)
            checked += 1
    # ... and a valid token gets past authentication on each of them.
    for method, path in endpoints:
        assert client.request(method, path, headers=ALICE).status_code != 401, (method, path)
    figure(
        f"{len(endpoints)} endpoints (+2 unknown paths) x {len(BAD_CREDENTIALS)} bad credentials: "
        f"{checked} answers all 401 problem+json with WWW-Authenticate; probes 200 without token"
    )


def _tiny_csv() -> bytes:
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40)]
    return ("\n".join(rows) + "\n").encode()


def test_jobs_datasets_and_models_belong_to_their_owner(
    client: TestClient, settings: Settings, figure: Callable[[str], None]
) -> None:
    r = client.post("/datasets", files={"file": ("mine.csv", _tiny_csv())}, headers=ALICE)
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    spec = {
        "name": "owned",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [8]},
        "search_space": {"parameters": {"learning_rate": {"type": "fixed", "value": 0.01}}},
        "n_trials": 1,
        "training": {"max_epochs": 1},
        "pruner": {"type": "none"},
    }
    r = client.post("/jobs", json=spec, headers=ALICE)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    _run_worker_once(settings)  # a real trial, so the job has a best model to protect
    assert client.get(f"/jobs/{job_id}/best/model", headers=ALICE).status_code == 200

    owned = [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/trials"),
        ("GET", f"/jobs/{job_id}/trials/0"),
        ("GET", f"/jobs/{job_id}/best"),
        ("GET", f"/jobs/{job_id}/best/model"),
        ("GET", f"/jobs/{job_id}/report"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("DELETE", f"/jobs/{job_id}"),
        ("GET", f"/datasets/{dataset_id}"),
    ]
    for method, path in owned:
        assert_problem(client.request(method, path, headers=BOB), 404)
        assert (
            client.request(
                "GET", path if method == "GET" else f"/jobs/{job_id}", headers=ALICE
            ).status_code
            == 200
        )
    assert client.get("/jobs", headers=BOB).json()["items"] == []
    assert client.get("/datasets", headers=BOB).json()["uploads"] == []
    # Bob cannot use Alice's upload in a job either (as if it did not exist).
    upload_spec = {**spec, "dataset": {"name": "upload", "id": dataset_id}}
    for path in ("/jobs", "/jobs/validate"):
        assert_problem(client.post(path, json=upload_spec, headers=BOB), 422, "dataset.id")
    assert client.post("/jobs/validate", json=upload_spec, headers=ALICE).status_code == 200
    # Nothing of Alice's changed.
    assert client.get(f"/jobs/{job_id}", headers=ALICE).json()["state"] == "succeeded"
    figure(
        f"{len(owned)} owner-only resources (job, trials, best, model, report, cancel, "
        "delete, dataset): 404 for the other owner; lists empty; upload id 422 in his spec"
    )


def _run_worker_once(settings: Settings) -> None:
    from worker.loop import Worker

    Worker(settings.model_copy(update={"population": 1, "device": "cpu"}), once=True).run()


@pytest.mark.slow
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_a_public_address_without_tokens(tmp_path: Path, host: str) -> None:
    port = free_port()
    env = hpo_env(tmp_path / "hpo-data")
    env.pop("HPO_API_TOKENS", None)
    r = run_hpo(["serve", "--host", host, "--port", str(port)], tmp_path, env=env, timeout=60)
    assert r.returncode != 0
    message = r.stderr + r.stdout
    assert "refusing to bind" in message and "HPO_API_TOKENS" in message, message
    with socket.socket() as s:  # and it never listened
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _compose_file() -> Path:
    for name in ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml"):
        if (REPO / name).is_file():
            return REPO / name
    pytest.fail("no docker-compose.yml at the repository root")


def test_compose_publishes_the_dashboard_on_loopback_only_and_says_why() -> None:
    path = _compose_file()
    text = path.read_text()
    services = yaml.safe_load(text)["services"]
    dashboards = [
        name
        for name, svc in services.items()
        if "dashboard" in name or "dashboard" in str(svc.get("command", ""))
    ]
    assert dashboards, f"no optuna-dashboard service in {path.name}"
    for name in dashboards:
        ports = services[name].get("ports", [])
        assert ports, f"{name} publishes no port"
        for p in ports:
            spec = p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published')}"
            assert str(spec).startswith("127.0.0.1:"), f"{name} publishes {p!r} beyond loopback"
        # The reason is written next to it: the dashboard has no authentication.
        block = text[text.index(f"{name}:") :]
        nxt = re.search(r"\n  [A-Za-z0-9_-]+:\n", block[len(name) + 1 :])
        block = block[: nxt.start() + len(name) + 1] if nxt else block
        comments = " ".join(line for line in block.splitlines() if "#" in line).lower()
        assert "auth" in comments or "loopback" in comments, (
            f"{name}: say in a comment why the dashboard is bound to 127.0.0.1"
        )
