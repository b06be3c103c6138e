"""spaces, datasets upload / list, dashboard, against the real server of ``conftest.live``."""

from __future__ import annotations

import http.client
import time

import numpy as np
import pytest
import yaml

from search_spaces import list_presets
from tests.hpo.live import Live
from tests.support.procs import HpoProcess, free_port, hpo_env, wait_until

pytestmark = pytest.mark.slow


def test_spaces_lists_every_preset(live: Live) -> None:
    out = live.ok("spaces").out
    for name in list_presets():
        assert name in out


def test_spaces_shows_one_preset_as_yaml(live: Live) -> None:
    space = yaml.safe_load(live.ok("spaces", "default").out)
    assert set(space["parameters"]) >= {"optimizer", "learning_rate", "weight_decay", "dropout"}
    assert space["parameters"]["learning_rate"]["log"] is True


def _write_csv(path: str, rows: int = 60) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    lines = ["a,b,c,d,label"] + [
        ",".join(f"{v:.5f}" for v in x) + f",{t}" for x, t in zip(X, y, strict=True)
    ]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def test_datasets_upload(live: Live) -> None:
    path = live.workdir / "two-blobs.csv"
    _write_csv(str(path))
    info = live.ok("datasets", "upload", str(path), "--json").json()
    assert info["name"] == "upload"
    assert info["rows"] == 60 and info["features"] == 4 and info["n_classes"] == 2
    assert len(info["id"]) >= 16

    human = live.ok("datasets", "upload", str(path)).out
    assert "uploaded two-blobs.csv: id" in human and "60 rows" in human


def test_datasets_list(live: Live) -> None:
    path = live.workdir / "listed.csv"
    _write_csv(str(path), rows=40)
    uploaded = live.ok("datasets", "upload", str(path), "--json").json()

    data = live.ok("datasets", "list", "--json").json()
    assert {"digits", "mnist", "fashion_mnist", "synthetic"} <= {b["name"] for b in data["builtin"]}
    assert uploaded["id"] in {u["id"] for u in data["uploads"]}

    table = live.ok("datasets", "list").out
    assert "digits" in table and "built-in" in table and "listed.csv" in table


def test_dashboard_serves_the_studies(live: Live, finished_job: dict[str, object]) -> None:
    port = free_port()
    proc = HpoProcess(
        ["dashboard", "--port", str(port)],
        live.workdir / "dashboard.log",
        hpo_env(live.data_root),
        live.workdir,
    )
    try:

        def studies() -> list[dict[str, object]]:
            import httpx

            assert proc.alive(), proc.log_tail()
            r = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=5)
            r.raise_for_status()
            return list(r.json()["study_summaries"])

        found = wait_until(
            lambda: [s for s in studies() if s["study_name"] == finished_job["study_name"]],
            60,
            what="the finished job's study on optuna-dashboard",
            diagnostics=proc.log_tail,
        )
        assert found[0]["directions"] == ["maximize"]
    finally:
        proc.stop()


def test_serve_keeps_an_idle_connection_open_past_a_clients_expiry(live: Live) -> None:
    """A client reuses an idle connection for up to its own expiry (httpx: 5 s). uvicorn's
    default keep-alive is also 5 s, so a request sent at that moment met a closing socket
    ("Server disconnected without sending a response"); ``hpo serve`` keeps it open longer."""
    host, port = live.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(6.0)  # past httpx's expiry and uvicorn's default keep-alive
        conn.request("GET", "/healthz")  # on the same socket: http.client does not reconnect
        again = conn.getresponse()
        again.read()
        assert again.status == 200
        assert conn.sock is sock
    finally:
        conn.close()
