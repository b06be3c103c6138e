"""Fixtures shared by every test folder: fresh databases (SQLite and PostgreSQL), the API app,
real ``hpo serve`` / ``hpo worker`` subprocesses. Helpers live in ``tests/support``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.postgres import fresh_database
from tests.support.procs import _LOCATION_VARS, HpoProcess, Server, start_server, start_worker


@pytest.fixture(autouse=True)
def _no_outside_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's HPO_DATABASE_URL (etc.) must never point a test at real data."""
    for name in _LOCATION_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database (SQLAlchemy URL), dropped after the test.
    Skips with the reason when the server is unreachable; fails instead when CI is set."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'hpo.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on a SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'hpo.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "hpo-data"
    root.mkdir()
    return root


@pytest.fixture
def hpo_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """start(data_root, database_url=None) -> a ready ``hpo serve`` on a free port; stopped after."""
    started: list[Server] = []

    def start(data_root: Path, database_url: str | None = None) -> Server:
        log_dir = tmp_path / "logs"
        log_dir.mkdir(exist_ok=True)
        server = start_server(data_root, database_url, log_dir)
        started.append(server)
        return server

    yield start
    for s in started:
        s.process.stop()


@pytest.fixture
def hpo_workers(tmp_path: Path) -> Iterator[Callable[..., list[HpoProcess]]]:
    """start(n, data_root, database_url=None, *args) -> n ``hpo worker`` processes; stopped after."""
    started: list[HpoProcess] = []

    def start(
        n: int, data_root: Path, database_url: str | None = None, *args: str
    ) -> list[HpoProcess]:
        log_dir = tmp_path / "logs"
        log_dir.mkdir(exist_ok=True)
        procs = [
            start_worker(data_root, database_url, log_dir, len(started) + i, *args)
            for i in range(n)
        ]
        started.extend(procs)
        return procs

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a measured figure (recovery time, counts); printed in the terminal summary, so a
    CI log carries the numbers the issues ask for."""

    def record(text: str) -> None:
        request.node.user_properties.append(("figure", text))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{rep.nodeid}: {v}"
        for key in ("passed", "failed")
        for rep in terminalreporter.stats.get(key, [])
        if getattr(rep, "when", "") == "call"
        for k, v in rep.user_properties
        if k == "figure"
    ]
    if lines:
        terminalreporter.section("measured figures")
        for line in lines:
            terminalreporter.write_line(line)
