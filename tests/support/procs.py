"""Real ``hpo`` subprocesses (serve, worker, dashboard, run) with logs in files and clean stops.

Every process is started in its own session and stopped by its own pid (SIGTERM, then SIGKILL
after a grace period); nothing is ever killed by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Settings that would point a subprocess at someone else's data; tests always pass their own.
_LOCATION_VARS = (
    "HPO_DATABASE_URL",
    "HPO_DATA_ROOT",
    "HPO_DATA_DIR",
    "HPO_ARTIFACT_DIR",
    "HPO_UPLOAD_DIR",
    "HPO_API_TOKENS",
    "HPO_SERVER",
    "HPO_TOKEN",
)


def hpo_executable() -> list[str]:
    """The ``hpo`` entry point of this interpreter's environment (falls back to ``-m hpo.cli``)."""
    exe = Path(sys.executable).with_name("hpo")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("hpo")
    return [found] if found else [sys.executable, "-m", "hpo.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hpo_env(data_root: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for an ``hpo`` subprocess: its own data root, offline, one torch thread.

    One intra-op thread per process: two workers and a server share 2 cores without thrashing.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LOCATION_VARS}
    env.update(
        HPO_DATA_ROOT=str(data_root),
        HPO_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HPO_LOG_LEVEL=env.get("HPO_LOG_LEVEL", "INFO"),
    )
    if database_url:
        env["HPO_DATABASE_URL"] = database_url
    env.update(extra)
    return env


@dataclass
class HpoProcess:
    """One running ``hpo`` command; stdout+stderr go to ``log``."""

    args: list[str]
    log: Path
    env: Mapping[str, str]
    cwd: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*hpo_executable(), *self.args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=dict(self.env),
            cwd=self.cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()
        return int(self.proc.returncode)


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    *,
    interval: float = 0.25,
    what: str = "condition",
    diagnostics: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError with diagnostics on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # a server still starting refuses connections
            last_exc = e
        time.sleep(interval)
    extra = f"\nlast error: {last_exc!r}" if last_exc else ""
    extra += f"\n{diagnostics()}" if diagnostics else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")


@dataclass
class Server:
    """A real ``hpo serve`` (uvicorn) on a free loopback port."""

    process: HpoProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.process.alive():
                raise AssertionError(f"hpo serve exited early:\n{self.process.log_tail()}")
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout, what="hpo serve /readyz", diagnostics=self.process.log_tail)


def start_server(data_root: Path, database_url: str | None, log_dir: Path) -> Server:
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = HpoProcess(args, log_dir / "serve.log", hpo_env(data_root, database_url), log_dir)
    server = Server(proc, port)
    server.wait_ready()
    return server


def start_worker(
    data_root: Path, database_url: str | None, log_dir: Path, index: int = 0, *extra: str
) -> HpoProcess:
    env = hpo_env(data_root, database_url, HPO_POLL_INTERVAL_S="0.3")
    return HpoProcess(["worker", *extra], log_dir / f"worker-{index}.log", env, log_dir)


def run_hpo(
    args: list[str], cwd: Path, *, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run an ``hpo`` command to completion (output captured as text)."""
    return subprocess.run(
        [*hpo_executable(), *args],
        cwd=cwd,
        env=dict(env if env is not None else hpo_env(cwd / "hpo-data")),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
