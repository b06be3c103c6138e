"""The job commands against a real server and worker: submit, submit --wait, jobs, show, trials,
best, cancel, download, report; tables for humans and ``--json`` for scripts."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from safetensors import safe_open

from tests.hpo.live import Live

pytestmark = pytest.mark.slow


def test_submit_prints_the_new_job(live: Live) -> None:
    spec = live.spec_file("cli-submit", n_trials=1, training={"max_epochs": 1})
    job = live.ok("submit", str(spec), "--json").json()
    assert job["name"] == "cli-submit"
    assert job["state"] in {"queued", "running", "succeeded"}
    assert job["n_trials"] == 1
    assert job["links"]["self"] == f"/jobs/{job['id']}"

    human = live.ok("submit", str(spec)).out
    assert "submitted job" in human and "cli-submit" in human and "1 trials" in human


def test_submit_wait_shows_progress_and_the_best_configuration(live: Live) -> None:
    r = live.ok("submit", str(live.spec_file("cli-wait")), "--wait")
    assert "succeeded: 3/3 trials" in r.out
    assert "best trial #" in r.out and "val_accuracy = " in r.out
    for name in ("optimizer", "learning_rate", "weight_decay", "dropout", "init"):
        assert f"  {name}: " in r.out  # the best configuration, one parameter per line
    assert "trials" in r.err  # the live progress bar goes to stderr, keeping stdout clean


def test_submit_wait_json(finished_job: dict[str, Any]) -> None:
    assert finished_job["state"] == "succeeded"
    assert finished_job["finished_trials"] == finished_job["n_trials"] == 3
    assert finished_job["trial_counts"]["complete"] == 3
    assert 0.0 < finished_job["best"]["value"] <= 1.0


def test_jobs_lists_newest_first(live: Live, finished_job: dict[str, Any]) -> None:
    data = live.ok("jobs", "--json").json()
    ids = [j["id"] for j in data["items"]]
    assert finished_job["id"] in ids
    created = [j["created_at"] for j in data["items"]]
    assert created == sorted(created, reverse=True)

    only = live.ok("jobs", "--state", "succeeded", "--json").json()["items"]
    assert only and {j["state"] for j in only} == {"succeeded"}

    table = live.ok("jobs").out
    assert finished_job["id"] in table and "cli-finished" in table and "3/3" in table


def test_show(live: Live, finished_job: dict[str, Any]) -> None:
    job = live.ok("show", finished_job["id"], "--json").json()
    assert job["id"] == finished_job["id"]
    assert job["state"] == "succeeded"
    assert job["spec"]["n_trials"] == 3
    assert job["best"]["trial_number"] == finished_job["best"]["trial_number"]
    assert job["elapsed_s"] > 0

    text = live.ok("show", finished_job["id"]).out
    assert "succeeded" in text and "trials 3/3" in text and "best so far: trial #" in text


def test_trials(live: Live, finished_job: dict[str, Any]) -> None:
    trials = live.ok("trials", finished_job["id"], "--json").json()
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert {t["state"] for t in trials} == {"complete"}
    for t in trials:
        assert 0.0 < t["value"] <= 1.0
        assert {"optimizer", "learning_rate", "init"} <= set(t["params"])
        assert t["epochs_run"] == 2

    assert live.ok("trials", finished_job["id"], "--state", "pruned", "--json").json() == []
    table = live.ok("trials", finished_job["id"]).out
    assert "learning_rate" in table and "complete" in table


def test_best(live: Live, finished_job: dict[str, Any]) -> None:
    trials = live.ok("trials", finished_job["id"], "--json").json()
    best = live.ok("best", finished_job["id"], "--json").json()
    assert best["value"] == max(t["value"] for t in trials)
    assert best["objective"] == "val_accuracy"
    assert 0.0 <= best["test_accuracy"] <= 1.0
    # The configuration holds the sampled parameters plus the job's fixed architecture.
    assert best["params"].items() <= best["config"].items()

    text = live.ok("best", finished_job["id"]).out
    assert f"best trial #{best['trial_number']}" in text and "test accuracy" in text


def test_cancel(live: Live) -> None:
    # Long enough that it is still queued or running when the cancel arrives.
    spec = live.spec_file("cli-cancel", n_trials=200, training={"max_epochs": 50})
    job = live.ok("submit", str(spec), "--json").json()
    after = live.ok("cancel", job["id"], "--json").json()
    assert after["id"] == job["id"]
    assert after["state"] in {"cancelling", "cancelled"}

    deadline = time.monotonic() + 60
    state = after["state"]
    while state != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.5)
        state = live.ok("show", job["id"], "--json").json()["state"]
    assert state == "cancelled"  # a running trial stops within one epoch

    again = live.ok("cancel", job["id"])  # cancelling a cancelled job is a no-op
    assert "is cancelled" in again.out


def test_download(live: Live, finished_job: dict[str, Any]) -> None:
    out = live.workdir / "best.safetensors"
    r = live.ok("download", finished_job["id"], "-o", str(out))
    assert f"wrote {out}" in r.out
    with safe_open(str(out), framework="pt") as f:
        names = list(f.keys())
        metadata = f.metadata()
    assert names, "the model file holds no tensors"
    assert any("weight" in n for n in names)
    assert metadata  # the architecture travels with the weights


def test_report(live: Live, finished_job: dict[str, Any]) -> None:
    out = live.workdir / "report.html"
    r = live.ok("report", finished_job["id"], "-o", str(out))
    html = out.read_text(encoding="utf-8")
    assert f"wrote {out}" in r.out
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:500].lower()
    assert "cli-finished" in html
    assert "Optimization history" in html and "Learning curves" in html
    # Self-contained: plotly.js is inlined; no script or stylesheet is loaded from elsewhere.
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert not re.search(r"<link[^>]*\bhref=", html)
    assert "Plotly.newPlot" in html
    assert out.stat().st_size > 1_000_000
