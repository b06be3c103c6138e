"""One real ``hpo serve`` and one real ``hpo worker`` (subprocesses on a temporary data root)
shared by all the CLI tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.hpo.live import Live
from tests.support.procs import start_server, start_worker


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("hpo-cli")
    data_root = root / "hpo-data"
    logs = root / "logs"
    data_root.mkdir()
    logs.mkdir()
    server = start_server(data_root, None, logs)
    worker = start_worker(data_root, None, logs)
    try:
        yield Live(server, worker, data_root, root)
    finally:
        worker.stop()
        server.process.stop()


@pytest.fixture(scope="package")
def finished_job(live: Live) -> dict[str, Any]:
    """A job submitted with ``hpo submit --wait --json`` and run to the end by the worker."""
    r = live.ok("submit", str(live.spec_file("cli-finished")), "--wait", "--json")
    job = r.json()
    assert job["state"] == "succeeded", job
    return dict(job)
