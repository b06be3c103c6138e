"""Failures exit non-zero with one line on stderr that says why (and where, for spec files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.hpo.live import Live
from tests.support.procs import free_port, hpo_env, run_hpo

pytestmark = pytest.mark.slow

UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "args",
    [
        ["show", UNKNOWN],
        ["show", UNKNOWN, "--json"],
        ["trials", UNKNOWN],
        ["best", UNKNOWN, "--json"],
        ["cancel", UNKNOWN],
        ["download", UNKNOWN, "-o", "never-written.safetensors"],
        ["report", UNKNOWN, "-o", "never-written.html"],
    ],
    ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else str(a),
)
def test_unknown_job_id(live: Live, args: list[str]) -> None:
    r = live.hpo(*args)
    assert r.code != 0
    line = r.error_line()
    assert "404" in line and UNKNOWN in line, line
    assert r.out == ""  # nothing half-written on stdout, even with --json
    assert not (live.workdir / "never-written.safetensors").exists()
    assert not (live.workdir / "never-written.html").exists()


def _bad_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad-spec.yaml"
    path.write_text(text)
    return path


def test_bad_spec_names_file_and_line(live: Live, tmp_path: Path) -> None:
    path = _bad_spec(
        tmp_path,
        "name: bad-spec\n"
        "dataset: {name: digits}\n"
        "n_trials: 4\n"
        "training:\n"
        "  max_epochs: 0\n"  # line 5: must be >= 1
        "  batch_sise: 64\n",  # line 6: a typo is an unknown field, not silently ignored
    )
    r = live.hpo("submit", str(path))
    assert r.code == 2
    line = r.error_line()
    assert f"{path}:5: training.max_epochs" in line
    assert f"{path}:6: training.batch_sise: unknown field" in line
    assert "bad-spec" not in {j["name"] for j in live.ok("jobs", "--json").json()["items"]}


def test_spec_that_is_not_yaml(live: Live, tmp_path: Path) -> None:
    path = _bad_spec(tmp_path, "name: bad\nsampler: {type: random\nn_trials: 3\n")
    r = live.hpo("submit", str(path), "--wait")
    assert r.code == 2
    line = r.error_line()
    assert f"{path}:" in line and "not valid YAML" in line


def test_missing_spec_file(live: Live, tmp_path: Path) -> None:
    r = live.hpo("submit", str(tmp_path / "nowhere.yaml"))
    assert r.code == 2
    assert "nowhere.yaml: no such file" in r.error_line()


def test_grid_budget_mismatch_names_the_line(live: Live, tmp_path: Path) -> None:
    path = _bad_spec(
        tmp_path, "name: bad-grid\nsearch_space: grid-small\nsampler: {type: grid}\nn_trials: 5\n"
    )
    r = live.hpo("submit", str(path))
    assert r.code == 2
    line = r.error_line()
    assert f"{path}:4: n_trials" in line and "grid size (16)" in line


def test_cancel_a_finished_job_is_refused(live: Live, finished_job: dict[str, Any]) -> None:
    r = live.hpo("cancel", finished_job["id"])
    assert r.code != 0
    line = r.error_line()
    assert "409" in line and "succeeded" in line


def test_unknown_preset(live: Live) -> None:
    r = live.hpo("spaces", "no-such-preset")
    assert r.code == 2
    assert "unknown search-space preset 'no-such-preset'" in r.error_line()


def test_upload_a_missing_file(live: Live, tmp_path: Path) -> None:
    r = live.hpo("datasets", "upload", str(tmp_path / "absent.csv"))
    assert r.code == 2
    assert "absent.csv: no such file" in r.error_line()


def test_upload_rejected_by_the_server(live: Live, tmp_path: Path) -> None:
    path = tmp_path / "words.csv"
    path.write_text("a,label\nhello,1\nworld,0\n")
    r = live.hpo("datasets", "upload", str(path), "--json")
    assert r.code != 0
    assert r.error_line().startswith("error: HTTP 4")
    assert r.out == ""


def test_server_unreachable(live: Live) -> None:
    r = live.hpo("jobs", "--server", f"http://127.0.0.1:{free_port()}")
    assert r.code != 0
    assert "cannot reach the server at http://127.0.0.1:" in r.error_line()


@pytest.mark.parametrize("value", ["0", "many"])
def test_worker_processes_must_be_auto_or_positive(live: Live, value: str) -> None:
    r = live.hpo("worker", "--processes", value, "--once")
    assert r.code == 2
    assert (
        f"--processes / HPO_WORKER_PROCESSES: expected 'auto' or a number >= 1, got '{value}'"
        in (r.error_line())
    )


def test_a_bad_setting_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    env = hpo_env(tmp_path / "data", HPO_WORKER_PROCESSES="x", HPO_PORT="abc")
    p = run_hpo(["worker", "--once"], tmp_path, env=env, timeout=60)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert "HPO_PORT='abc': Input should be a valid integer" in err, err
    assert "HPO_WORKER_PROCESSES='x': must be 'auto' or a number >= 1" in err, err
