"""Limits, configurable, with clear messages: trials, epochs, width and depth (parameter count),
grid size, dataset rows / features / bytes (413, counted on the bytes received: a chunked
upload, or one whose Content-Length lies, cannot slip past), and active jobs per owner (429)."""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.security.conftest import ALICE, BOB, LIMITS
from tests.support.api import assert_problem
from tests.support.procs import Server


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "limits",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [32]},
        "search_space": "default",
        "n_trials": 5,
        "training": {"max_epochs": 5},
    }
    base.update(over)
    return base


GRID_125 = {
    "parameters": {
        "learning_rate": {
            "type": "float",
            "low": 1e-4,
            "high": 1e-1,
            "grid": [1e-4, 1e-3, 1e-2, 3e-2, 1e-1],
        },
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "grid": [0.0, 0.1, 0.2, 0.3, 0.4]},
        "weight_decay": {
            "type": "float",
            "low": 0.0,
            "high": 0.1,
            "grid": [0.0, 1e-4, 1e-3, 1e-2, 0.1],
        },
    }
}
SPEC_LIMITS = [
    # (what, spec, field, words the message must contain)
    ("n_trials", spec(n_trials=51), "n_trials", ["51", "50"]),
    ("epochs", spec(training={"max_epochs": 31}), "training.max_epochs", ["31", "30"]),
    ("width", spec(model={"hidden_layers": [257]}), "model.hidden_layers", ["257", "256"]),
    ("depth", spec(model={"hidden_layers": [8] * 5}), "model.hidden_layers", ["5", "4"]),
    (
        "parameters",
        spec(dataset={"name": "mnist"}, model={"hidden_layers": [256, 256, 256, 256]}),
        "model.hidden_layers",
        ["parameters", "300,000"],
    ),
    (
        "searched width",
        spec(
            model={"hidden_layers": [64, 64]},
            search_space={
                "parameters": {"hidden_width": {"type": "int", "low": 8, "high": 10_000}}
            },
        ),
        "model.hidden_layers",
        ["parameters"],
    ),
    (
        "grid size",
        spec(sampler={"type": "grid"}, search_space=GRID_125, n_trials=None),
        "search_space",
        ["125", "64"],
    ),
    (
        "synthetic rows",
        spec(dataset={"name": "synthetic", "n_samples": 501}),
        "dataset.n_samples",
        ["501", "500"],
    ),
    (
        "synthetic features",
        spec(dataset={"name": "synthetic", "n_features": 41, "n_samples": 100}),
        "dataset.n_features",
        ["41", "40"],
    ),
]


@pytest.mark.parametrize(
    ("what", "body", "field", "words"), SPEC_LIMITS, ids=[c[0] for c in SPEC_LIMITS]
)
def test_spec_limits_answer_422_naming_the_field(
    client: TestClient, what: str, body: dict[str, Any], field: str, words: list[str]
) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    for path in ("/jobs/validate", "/jobs"):
        problem = assert_problem(client.post(path, json=body, headers=ALICE), 422)
        fields = {problem.get("field")} | {e["field"] for e in problem.get("errors") or []}
        assert field in fields, (what, problem)
        for w in words:
            assert w in problem["detail"], (what, w, problem["detail"])
    assert client.get("/jobs", headers=ALICE).json()["items"] == []


def _csv(rows: int, features: int) -> bytes:
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    lines = [header] + [",".join(["1"] * features + [str(r % 2)]) for r in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def _npz(rows: int, features: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, X=np.ones((rows, features), dtype=np.float32), y=np.arange(rows) % 2)
    return buf.getvalue()


def test_dataset_limits_answer_413_with_the_limit(client: TestClient, settings: Settings) -> None:
    cases = [
        ("rows.csv", _csv(501, 3), "500"),
        ("features.csv", _csv(10, 41), "40"),
        ("rows.npz", _npz(501, 3), "500"),
        ("features.npz", _npz(10, 41), "40"),
        # Within the multipart envelope allowance, so the route's exact count answers.
        ("big.csv", b"a,label\n" + b"1,0\n" * (LIMITS["max_upload_bytes"] // 4), "65,536"),
        # Far over: refused on the declared Content-Length before the body is read.
        ("huge.csv", b"a,label\n" + b"1,0\n" * LIMITS["max_upload_bytes"], "limit"),
    ]
    for name, content, words in cases:
        r = client.post("/datasets", files={"file": (name, content)}, headers=ALICE)
        problem = assert_problem(r, 413)
        assert words in problem["detail"], (name, problem["detail"])
    assert client.get("/datasets", headers=ALICE).json()["uploads"] == []
    assert not list(settings.resolved_upload_dir.rglob("*.csv"))
    assert not list(settings.resolved_upload_dir.rglob("*.npz"))


def test_active_jobs_per_owner_answer_429_with_retry_after(client: TestClient) -> None:
    ids = []
    for i in range(LIMITS["max_active_jobs_per_owner"]):
        r = client.post("/jobs", json=spec(name=f"j{i}"), headers=ALICE)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/jobs", json=spec(name="one-too-many"), headers=ALICE)
    problem = assert_problem(r, 429)
    assert int(r.headers["retry-after"]) > 0
    assert "3 active jobs" in problem["detail"] and "limit 3" in problem["detail"]
    assert client.post("/jobs", json=spec(name="bobs"), headers=BOB).status_code == 201
    assert client.post(f"/jobs/{ids[0]}/cancel", headers=ALICE).status_code == 200
    assert client.post("/jobs", json=spec(name="again"), headers=ALICE).status_code == 201


def test_json_bodies_are_bounded_too(client: TestClient) -> None:
    huge = spec(model={"hidden_layers": [1] * 600_000})  # 1.2 MB of JSON
    problem = assert_problem(client.post("/jobs", json=huge, headers=ALICE), 413)
    assert "max_request_bytes" in problem["detail"]


# A real server: the size of what arrives is counted, whatever the headers claim ----------------


@pytest.fixture
def upload_server(server: Server) -> Iterator[Server]:
    yield server


def _multipart(content: bytes, boundary: str = "XyZ") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _raw_request(port: int, head: str, body: Iterator[bytes]) -> bytes:
    """Send ``head`` then ``body`` pieces on a fresh connection; return what the server says.
    The server may answer (and close) before the body is through: that is the point."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        try:
            for piece in body:
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and len(data) > 200:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.slow
def test_upload_size_is_measured_on_received_bytes(
    upload_server: Server, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    port = upload_server.port
    token = ALICE["Authorization"]
    one_mb = _multipart(b"a,label\n" + b"1,0\n" * (256 * 1024))  # 1 MiB of CSV, limit 64 KiB
    base = (
        f"POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
    )

    def chunked(data: bytes, size: int = 8192) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            piece = data[i : i + size]
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    results = {}
    # 1. No Content-Length at all (chunked): counted as it arrives.
    results["chunked, no length"] = _status(
        _raw_request(
            port, base + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n", chunked(one_mb)
        )
    )
    # 2. httpx streaming a generator (also chunked), the way a real client would.
    with httpx.Client(base_url=upload_server.url, timeout=30) as c:
        r = c.post(
            "/datasets",
            content=chunked_plain(one_mb),
            headers={**ALICE, "Content-Type": "multipart/form-data; boundary=XyZ"},
        )
        assert r.headers["content-type"].startswith("application/problem+json")
        results["httpx stream"] = r.status_code
    # 3. Content-Length claims less than is sent: only the declared bytes are read as the body
    #    (a truncated form, refused); the rest is never taken as part of the upload.
    results["length understated"] = _status(
        _raw_request(
            port, base + "Content-Length: 1000\r\nConnection: close\r\n\r\n", iter([one_mb])
        )
    )
    # 4. Content-Length claims more than the limit: refused before reading.
    results["length overstated"] = _status(
        _raw_request(
            port, base + f"Content-Length: {10**9}\r\nConnection: close\r\n\r\n", iter([b"x" * 100])
        )
    )
    # 5. Both headers (a request-smuggling shape): refused.
    results["length + chunked"] = _status(
        _raw_request(
            port,
            base + "Content-Length: 100\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            chunked(one_mb),
        )
    )
    assert results["chunked, no length"] == 413, results
    assert results["httpx stream"] == 413, results
    assert results["length overstated"] == 413, results
    assert results["length understated"] in (400, 422), results
    assert 400 <= results["length + chunked"] < 500, results
    with httpx.Client(base_url=upload_server.url, timeout=30) as c:
        assert c.get("/datasets", headers=ALICE).json()["uploads"] == []
    uploads = upload_server.process.cwd / "hpo-data" / "uploads"
    assert not [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else True
    figure(f"1 MiB upload vs a 64 KiB limit: {results}; nothing stored")


def chunked_plain(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
