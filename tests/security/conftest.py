"""Fixtures for the security tests: the API with bearer tokens and small limits, in-process
(FastAPI TestClient, lifespan running, real SQLite and files) or as a real ``hpo serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.support.procs import HpoProcess, Server, free_port, hpo_env

TOKENS = "alice:alice-token-0123456789,bob:bob-token-0123456789"
ALICE = {"Authorization": "Bearer alice-token-0123456789"}
BOB = {"Authorization": "Bearer bob-token-0123456789"}
# Small limits, so every limit can be crossed with small requests.
LIMITS = {
    "max_n_trials": 50,
    "max_epochs": 30,
    "max_hidden_width": 256,
    "max_hidden_layers": 4,
    "max_parameters": 300_000,
    "max_grid_size": 64,
    "max_upload_bytes": 64 * 1024,
    "max_dataset_rows": 500,
    "max_dataset_features": 40,
    "max_active_jobs_per_owner": 3,
}


def limit_env() -> dict[str, str]:
    return {f"HPO_{k.upper()}": str(v) for k, v in LIMITS.items()}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data_root = tmp_path / "hpo-data"
    (data_root / "datasets").mkdir(parents=True)
    return Settings(data_root=data_root, api_tokens=TOKENS).model_copy(update=LIMITS)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def start_secure_server(root: Path, **env: str) -> Server:
    """A real ``hpo serve`` with tokens and the small limits (plus ``env``), on a free port."""
    data_root = root / "hpo-data"
    (data_root / "datasets").mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = HpoProcess(
        ["serve", "--host", "127.0.0.1", "--port", str(port)],
        root / "serve.log",
        hpo_env(data_root, None, **{"HPO_API_TOKENS": TOKENS, **limit_env(), **env}),
        root,
    )
    server = Server(proc, port)
    server.wait_ready()
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_secure_server(tmp_path)
    yield s
    s.process.stop()
