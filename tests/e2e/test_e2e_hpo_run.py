"""``hpo run`` as a user runs it: a subprocess in a fresh directory, then the results read back the
ways the README promises (Optuna from another process, optuna-dashboard, the saved model)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from service.spec import JobSpec, load_spec_file
from tests.support.models import split_accuracy
from tests.support.procs import HpoProcess, free_port, hpo_env, run_hpo, wait_until
from tests.support.specs import grid_spec

pytestmark = pytest.mark.slow


@dataclass
class Run:
    cwd: Path
    spec: JobSpec
    result: subprocess.CompletedProcess[str]

    @property
    def data_root(self) -> Path:
        return self.cwd / "hpo-data"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.data_root / 'hpo.db'}"

    def study(self) -> optuna.Study:
        [name] = optuna.get_all_study_names(self.url)
        return optuna.load_study(study_name=name, storage=self.url)

    def output(self) -> str:
        return f"exit {self.result.returncode}\nstdout:\n{self.result.stdout[-3000:]}\nstderr:\n{self.result.stderr[-3000:]}"


def hpo_run(cwd: Path, spec: dict[str, Any], **env: str) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_hpo(["run", "job.yaml"], cwd, env=hpo_env(cwd / "hpo-data", **env), timeout=240)
    run = Run(cwd, load_spec_file(cwd / "job.yaml"), result)
    assert result.returncode == 0, run.output()
    return run


def key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return hpo_run(tmp_path_factory.mktemp("grid"), grid_spec(name="e2e-grid"))


def test_grid_runs_each_point_exactly_once(grid_run: Run) -> None:
    study = grid_run.study()
    trials = study.get_trials()
    size = grid_run.spec.budget()
    assert size == 16
    assert len(trials) == size, grid_run.output()
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    got = sorted(key(t.params) for t in trials)
    expected = sorted(key(p) for p in grid_run.spec.grid_points(limit=100))
    assert got == expected
    assert "succeeded" in grid_run.result.stdout
    assert "Best trial" in grid_run.result.stdout


def test_load_study_from_another_process(grid_run: Run) -> None:
    code = """
import json, sys, optuna
url = sys.argv[1]
[name] = optuna.get_all_study_names(url)
study = optuna.load_study(study_name=name, storage=url)
print(json.dumps({
    "name": name,
    "direction": study.direction.name,
    "trials": [
        {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
         "intermediate": {str(k): v for k, v in t.intermediate_values.items()}}
        for t in study.trials
    ],
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, grid_run.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["direction"] == "MAXIMIZE"
    assert len(data["trials"]) == 16
    epochs = grid_run.spec.training.max_epochs
    for t in data["trials"]:
        assert set(t["params"]) == {"optimizer", "learning_rate", "dropout", "init"}
        assert sorted(int(k) for k in t["intermediate"]) == list(range(1, epochs + 1)), t
        assert t["value"] == max(t["intermediate"].values())  # objective = best val accuracy
    here = {t.number: t.params for t in grid_run.study().trials}
    assert {t["number"]: t["params"] for t in data["trials"]} == here


def test_dashboard_lists_the_study(grid_run: Run, tmp_path: Path) -> None:
    port = free_port()
    proc = HpoProcess(
        ["dashboard", "--storage", grid_run.url, "--port", str(port)],
        tmp_path / "dashboard.log",
        hpo_env(grid_run.data_root),
        grid_run.cwd,
    )
    try:

        def studies() -> list[dict[str, Any]]:
            r = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=5)
            return list(r.json()["study_summaries"]) if r.status_code == 200 else []

        summaries = wait_until(
            studies, 60, what="optuna-dashboard /api/studies", diagnostics=proc.log_tail
        )
        [name] = optuna.get_all_study_names(grid_run.url)
        assert [s["study_name"] for s in summaries] == [name]
        study_id = summaries[0]["study_id"]
        detail = httpx.get(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=10).json()
        assert len(detail["trials"]) == 16
    finally:
        proc.stop()


def test_best_model_reproduces_its_validation_accuracy(grid_run: Run) -> None:
    best = grid_run.study().best_trial
    aid = best.user_attrs["model_artifact_id"]
    path = grid_run.data_root / "artifacts" / aid
    assert path.is_file()
    got = split_accuracy(path, grid_run.spec, grid_run.data_root)
    assert got["val_accuracy"] == pytest.approx(best.value, abs=1e-9)
    assert got["val_accuracy"] == pytest.approx(best.user_attrs["best_val_accuracy"], abs=1e-9)
    assert got["test_accuracy"] == pytest.approx(best.user_attrs["test_accuracy"], abs=1e-9)
    assert best.value > 0.8


HOPELESS = {
    # examples/digits-hopeless-lr.yaml scaled down: 12 trials of 4 epochs, learning rates up to 10
    "name": "e2e-hopeless",
    "dataset": {"name": "digits"},
    "model": {"hidden_layers": [32]},
    "search_space": {
        "parameters": {
            "optimizer": {"type": "categorical", "choices": ["sgd", "momentum"]},
            "learning_rate": {"type": "float", "low": 1.0e-4, "high": 10.0, "log": True},
            "init": {"type": "categorical", "choices": ["he_normal", "xavier_uniform"]},
        }
    },
    # seed 0 draws momentum with learning rate 8.9 (trial 1 diverges) and tiny rates (pruned)
    "sampler": {"type": "random", "seed": 0},
    "n_trials": 12,
    "training": {"max_epochs": 4},
    "pruner": {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
}


@pytest.mark.parametrize("population", ["1", "auto"])
def test_median_pruning_and_divergence(tmp_path: Path, population: str) -> None:
    env = {"HPO_POPULATION": population} if population != "auto" else {}
    run = hpo_run(tmp_path, HOPELESS, **env)
    trials = run.study().get_trials()
    assert len(trials) == 12
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    diverged = [t for t in trials if t.user_attrs.get("diverged")]
    pruned = [
        t for t in trials if t.state == TrialState.PRUNED and not t.user_attrs.get("diverged")
    ]
    summary = [
        (t.number, t.state.name, t.params, t.value, t.user_attrs.get("diverged")) for t in trials
    ]
    assert diverged, summary
    assert all(t.state == TrialState.PRUNED and t.user_attrs["diverged_reason"] for t in diverged)
    # hopeless trials stop early: pruned by the median rule before their last epoch
    assert pruned, summary
    assert all(len(t.intermediate_values) < 4 for t in pruned), summary
    for t in pruned:  # a pruned trial records what it trained, as a finished one does
        assert t.user_attrs["epochs_run"] == len(t.intermediate_values), summary
        assert [h["epoch"] for h in t.user_attrs["history"]] == sorted(t.intermediate_values)
        assert t.user_attrs["duration_s"] > 0
        assert "train_accuracy" not in t.user_attrs  # the train-split evaluation is for finishers
    best = run.study().best_trial
    assert not best.user_attrs.get("diverged")
    assert best.value is not None and 0.8 < best.value <= 1.0
    assert best.params["learning_rate"] < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_a_population_job_on_cuda(tmp_path: Path, precision: str) -> None:
    """The CUDA path end to end: one GPU stack holds every trial after the pruner's start-up
    ones, members are pruned against those, and the saved best model reproduces on the CPU."""
    spec = {
        "name": f"e2e-cuda-{precision}",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [64]},
        "search_space": "default",
        "sampler": {"type": "random", "seed": 0},
        "n_trials": 40,
        "training": {"max_epochs": 4, "device": "cuda", "precision": precision},
        "pruner": {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
    }
    run = hpo_run(tmp_path, spec, HPO_DEVICE="cuda")
    trials = run.study().get_trials()
    summary = [(t.number, t.state.name, t.user_attrs.get("population")) for t in trials]
    assert len(trials) == 40
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), summary
    sizes = [t.user_attrs["population"]["size"] for t in trials if "population" in t.user_attrs]
    assert max(sizes) >= 30, summary  # the 35 after the start-up trials, in one stack
    assert any(t.state == TrialState.PRUNED for t in trials), summary
    best = run.study().best_trial
    assert best.value is not None and best.value > 0.8
    got = split_accuracy(
        run.data_root / "artifacts" / best.user_attrs["model_artifact_id"], run.spec, run.data_root
    )
    # fp32 on the GPU and on the CPU differ in the last bits only; tf32/bf16 validated in
    # their own precision
    assert got["val_accuracy"] == pytest.approx(
        best.value, abs=0.01 if precision == "fp32" else 0.03
    )


def test_same_spec_and_seed_reproduce_every_trial(tmp_path: Path) -> None:
    spec = {
        "name": "e2e-repro",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [32]},
        "search_space": "default",
        "sampler": {"type": "random", "seed": 11},
        "n_trials": 5,
        "training": {"max_epochs": 2, "seed": 3},
        "pruner": {"type": "none"},
    }

    def trials(run: Run) -> list[tuple[Any, ...]]:
        return [
            (t.number, t.state, t.params, t.value, t.intermediate_values, t.user_attrs.get("seed"))
            for t in sorted(run.study().trials, key=lambda t: t.number)
        ]

    a = trials(hpo_run(tmp_path / "a", spec))
    b = trials(hpo_run(tmp_path / "b", spec))
    assert len(a) == 5
    assert a == b


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: bad\nn_trials: 2\ntraining:\n  max_epochs: 0\n",
            "job.yaml:4: training.max_epochs:",
        ),
        ("name: bad\nn_trials: [2\n", "job.yaml:3: not valid YAML/JSON"),
    ],
)
def test_invalid_spec_exits_2_naming_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "job.yaml").write_text(text)
    r = run_hpo(["run", "job.yaml"], tmp_path, env=hpo_env(tmp_path / "hpo-data"), timeout=60)
    assert r.returncode == 2, r.stderr
    assert expected in " ".join(r.stderr.split()), r.stderr
    assert not (tmp_path / "hpo-data" / "hpo.db").exists()  # nothing ran, nothing was created
