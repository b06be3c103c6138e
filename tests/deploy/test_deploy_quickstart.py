"""The README's first command, ./scripts/quickstart.sh, end to end on a small spec: install
check, API + worker in the background, a job over HTTP, best configuration, report, cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.compose_local import REPO, venv_installed_by_install_sh
from tests.support.procs import free_port

pytestmark = pytest.mark.slow


def _run_quickstart(
    tmp_path: Path, spec: dict[str, object]
) -> tuple[subprocess.CompletedProcess[str], Path, int]:
    venv = venv_installed_by_install_sh()
    if venv is None:
        pytest.skip("this venv was not made by scripts/install.sh (CI runs this test)")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    env.update(VENV_DIR=str(venv), HPO_DATA_ROOT=str(data), HPO_PORT=str(port), HPO_OFFLINE="1")
    p = subprocess.run(
        ["bash", str(REPO / "scripts/quickstart.sh"), str(spec_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return p, data, port


def _nothing_listens(port: int) -> bool:
    """True when a connection to the port is refused (a bind test would trip over TIME_WAIT)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_quickstart_runs_a_job_and_cleans_up(tmp_path: Path) -> None:
    spec = {
        "name": "quickstart-small",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [32]},
        "n_trials": 3,
        "training": {"max_epochs": 2},
        "pruner": {"type": "none"},
    }
    p, data, port = _run_quickstart(tmp_path, spec)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert f"starting the API on http://127.0.0.1:{port}" in out
    assert "succeeded: 3/3 trials" in out
    assert "best trial #" in out and "  learning_rate: " in out
    db_url = f"sqlite:///{data}/hpo.db"
    assert f"bin/optuna-dashboard {db_url} --port 8080" in out  # the exact command to open it
    reports = list((data / "reports").glob("*.html"))
    assert len(reports) == 1 and reports[0].stat().st_size > 1_000_000
    assert (data / "logs" / "serve.log").is_file() and (data / "logs" / "worker.log").is_file()
    assert _nothing_listens(port), "the API is still running after the script ended"
    assert "worker stopped after" in (data / "logs" / "worker.log").read_text()  # clean SIGTERM


def test_quickstart_fails_on_a_bad_spec(tmp_path: Path) -> None:
    p, _, port = _run_quickstart(tmp_path, {"name": "bad", "n_trials": 0})
    assert p.returncode == 2
    assert "spec.yaml:" in p.stderr and "n_trials" in p.stderr
    assert _nothing_listens(port)
