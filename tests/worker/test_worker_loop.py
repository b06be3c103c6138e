"""The worker loop in-process on a real SQLite file: budgets, grids, divergence, cancellation,
jobs that cannot start, and a dead worker's trial retried with the same parameters."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from search_spaces import load_preset
from search_spaces.sampling import suggest
from service.config import Settings
from service.db import Job, JobStore, create_schema, make_engine
from service.spec import JobSpec
from service.states import JobState
from service.studies import WORKER_ATTR, create_job_study, make_storage
from service.submission import submit
from tests.support.specs import grid_spec, random_spec
from worker.loop import (
    PRUNER_WAVES,
    Worker,
    pruner_startup_cap,
    pruner_wave_cap,
    sibling_share_cap,
)
from worker.trial_config import trial_seed

PROBE_S = 0.5  # JobStateProbe: a worker re-reads its job's state at most this often


@dataclass
class Env:
    settings: Settings
    jobs: JobStore
    storage: optuna.storages.BaseStorage

    def submit(self, spec: dict[str, Any] | JobSpec) -> Job:
        s = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        return submit(s, settings=self.settings, jobs=self.jobs, storage=self.storage)[0]

    def study(self, job: Job) -> optuna.Study:
        return optuna.load_study(study_name=job.study_name, storage=self.storage)

    def worker(self, **kw: Any) -> Worker:
        return Worker(self.settings, **kw)


def make_env(root: Path, **settings: Any) -> Env:
    s = Settings(data_root=root, **settings)
    engine = make_engine(s.resolved_database_url)
    create_schema(engine)
    return Env(s, JobStore(engine), make_storage(s.resolved_database_url, s))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path / "data")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def assert_exact_budget(env: Env, job: Job) -> None:
    fresh = env.jobs.get(job.id)
    study = env.study(job)
    assert fresh.state == "succeeded", (fresh.state, fresh.error)
    assert len(finished(study)) == fresh.n_trials == fresh.finished
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.parametrize("population", [1, None], ids=["sequential", "auto-population"])
def test_a_job_runs_exactly_its_budget(env: Env, population: int | None) -> None:
    env.settings = env.settings.model_copy(update={"population": population})
    job = env.submit(random_spec(n_trials=5))
    assert env.worker(once=True).run() == 5
    assert_exact_budget(env, job)
    for t in finished(env.study(job)):
        assert t.user_attrs["epochs_run"] == 2
        assert sorted(t.intermediate_values) == [1, 2]
        assert ("momentum" in t.params) == (t.params["optimizer"] in ("momentum", "nesterov"))


@pytest.mark.slow
def test_population_results_equal_sequential_results(tmp_path: Path) -> None:
    """The invariant that makes population training safe, end to end through the worker: every
    optimizer, init, learning rate and weight decay of the default space, dropout 0. (With dropout
    the stack shares one mask generator, so members match their solo selves only in distribution.)"""
    space = load_preset("default").model_dump(mode="json", exclude_none=True)
    space["parameters"]["dropout"] = {"type": "fixed", "value": 0.0}
    # Up to 0.03: at the top of the default range (0.1) RMSprop is chaotic, and the different
    # float summation order of a stack grows past any fixed tolerance within 3 epochs (seen:
    # rmsprop at 0.093, best validation loss 1.38264 vs 1.38219).
    space["parameters"]["learning_rate"]["high"] = 0.03
    spec = random_spec(n_trials=8, search_space=space, training={"max_epochs": 3})
    runs = {}
    for population in (1, 8):
        env = make_env(tmp_path / f"p{population}", population=population)
        job = env.submit(spec)
        env.worker(once=True).run()
        assert_exact_budget(env, job)
        runs[population] = sorted(env.study(job).trials, key=lambda t: t.number)
    n_val = 360  # digits: ceil(0.2 * 1797)
    for a, b in zip(runs[1], runs[8], strict=True):
        assert a.params == b.params and a.state == b.state
        assert a.user_attrs["seed"] == b.user_attrs["seed"]
        if a.state == TrialState.COMPLETE:
            assert abs(a.value - b.value) <= 1 / n_val, (a.number, a.params, a.value, b.value)
            assert a.user_attrs["best_val_loss"] == pytest.approx(
                b.user_attrs["best_val_loss"], rel=1e-4
            ), (a.number, a.params)


@pytest.mark.parametrize("population", [1, 4], ids=["one-trial", "population-4"])
def test_bf16_jobs_train_in_the_population_trainer_and_match_fp32(
    tmp_path: Path, population: int
) -> None:
    """training.precision bf16: every trial (a lone one too) trains with bfloat16 matmuls and
    lands close to its fp32 twin: same parameters, validation accuracy within a few points."""
    space = load_preset("default").model_dump(mode="json", exclude_none=True)
    space["parameters"]["dropout"] = {"type": "fixed", "value": 0.0}
    values = {}
    for precision in ("fp32", "bf16"):
        env = make_env(tmp_path / f"{precision}-{population}", population=population)
        spec = random_spec(
            n_trials=4, search_space=space, training={"max_epochs": 3, "precision": precision}
        )
        job = env.submit(spec)
        env.worker(once=True).run()
        assert_exact_budget(env, job)
        values[precision] = {
            t.number: (t.params, t.user_attrs["best_val_accuracy"])
            for t in finished(env.study(job))
        }
    assert values["fp32"].keys() == values["bf16"].keys()
    differs = False
    for number, (params, acc) in values["fp32"].items():
        bf16_params, bf16_acc = values["bf16"][number]
        assert bf16_params == params
        assert abs(bf16_acc - acc) <= 0.05, (number, params, acc, bf16_acc)
        differs |= bf16_acc != acc
    assert differs  # bf16 really trained differently (the fp32 path would be identical)


def test_max_trials_is_respected(env: Env) -> None:
    job = env.submit(random_spec(n_trials=5))
    assert env.worker(once=True, max_trials=2).run() == 2
    fresh = env.jobs.get(job.id)
    assert fresh.state == "running" and fresh.finished == 2 and fresh.reserved == 2
    assert len(env.study(job).trials) == 2
    assert env.worker(once=True).run() == 3  # a second worker finishes the rest
    assert_exact_budget(env, job)


def test_grid_job_runs_each_point_once(env: Env) -> None:
    spec = JobSpec.model_validate(grid_spec(training={"max_epochs": 1}))
    job = env.submit(spec)
    env.worker(once=True).run()
    assert_exact_budget(env, job)
    got = sorted(json.dumps(t.params, sort_keys=True) for t in env.study(job).trials)
    assert got == sorted(json.dumps(p, sort_keys=True) for p in spec.grid_points(limit=100))


def test_diverged_trials_are_recorded_and_never_best(env: Env) -> None:
    space = {
        "parameters": {
            "optimizer": {"type": "fixed", "value": "sgd"},
            "learning_rate": {"type": "categorical", "choices": [50.0, 0.5]},
        }
    }
    job = env.submit(random_spec(n_trials=6, search_space=space, sampler={"seed": 0}))
    env.worker(once=True).run()
    assert_exact_budget(env, job)
    study = env.study(job)
    diverged = [t for t in study.trials if t.user_attrs.get("diverged")]
    assert diverged, [(t.params, t.state) for t in study.trials]
    for t in diverged:
        assert t.state == TrialState.PRUNED
        assert t.params["learning_rate"] == 50.0
        assert t.user_attrs["diverged_reason"]
    best = study.best_trial
    assert best.params["learning_rate"] == 0.5 and best.value > 0.5


def test_cancelled_job_is_not_run(env: Env) -> None:
    job = env.submit(random_spec())
    assert env.jobs.transition(job.id, JobState.CANCELLED)
    assert env.worker(once=True).run() == 0
    assert env.study(job).trials == []


@pytest.mark.slow
def test_cancelling_a_running_job_stops_the_worker_between_epochs(env: Env) -> None:
    env.settings = env.settings.model_copy(update={"population": 1})
    job = env.submit(random_spec(n_trials=3, training={"max_epochs": 1000, "early_stopping": None}))

    class CancelAfterTwoEpochs:
        times: list[float] = []
        cancelled_at = 0.0

        def epoch_done(self, job_: Job, number: int, metrics: Any) -> None:
            self.times.append(time.monotonic())
            if len(self.times) == 2:
                env.jobs.transition(job.id, JobState.CANCELLING)
                self.cancelled_at = time.monotonic()

        def trials_done(self, job_: Job, outcomes: Any) -> None:
            pass

    listener = CancelAfterTwoEpochs()
    env.worker(job_id=job.id, listener=listener).run()
    fresh = env.jobs.get(job.id)
    assert fresh.state == "cancelled"
    [t] = env.study(job).trials
    assert t.state == TrialState.FAIL
    assert "cancel" in t.user_attrs["fail_reason"]
    assert fresh.failures == 0  # a cancellation is not the trial's failure
    assert len(t.intermediate_values) == len(listener.times) < 1000
    # The worker re-reads the job's state at most every PROBE_S: it stops at the first epoch
    # boundary after that, so every epoch but the last one ended within PROBE_S of the cancel.
    late = listener.times[-2] - listener.cancelled_at
    assert late <= PROBE_S + 0.1, (late, len(listener.times))


def test_a_job_whose_data_cannot_load_fails_with_the_reason(env: Env) -> None:
    spec = JobSpec.model_validate(random_spec(dataset={"name": "csv", "path": "missing.csv"}))
    job, _ = env.jobs.create(spec)
    create_job_study(env.storage, job.study_name, spec, job_id=job.id, max_grid_size=100)
    env.worker(once=True).run()
    fresh = env.jobs.get(job.id)
    assert fresh.state == "failed"
    assert "cannot start" in (fresh.error or "") and "missing.csv" in (fresh.error or "")
    assert fresh.reserved == 0


@pytest.mark.slow
def test_a_dead_workers_trial_is_retried_with_the_same_parameters(tmp_path: Path) -> None:
    env = make_env(tmp_path / "data", heartbeat_interval_s=1, heartbeat_grace_s=2, population=1)
    job = env.submit(random_spec(n_trials=3))
    # A worker that reserved a slot, asked a trial, beat once and died.
    assert env.jobs.reserve_slot(job.id)
    env.jobs.transition(job.id, JobState.RUNNING)
    hb_storage = make_storage(env.settings.resolved_database_url, env.settings, heartbeat=True)
    study = optuna.load_study(study_name=job.study_name, storage=hb_storage)
    spec = JobSpec.model_validate_json(env.jobs.get(job.id).spec_json)
    dead = study.ask()
    dead_params = suggest(spec.resolved_space(), dead)
    hb_storage.record_heartbeat(dead._trial_id)
    # SQLite's CURRENT_TIMESTAMP has whole seconds and stale means "older than the grace":
    # 3.3 s apart always reads as 3 or 4 s > 2 s.
    time.sleep(3.3)

    ran = env.worker(once=True).run()
    study = env.study(job)
    summary = [(t.number, t.state.name, t.params, dict(t.system_attrs)) for t in study.trials]
    fresh = env.jobs.get(job.id)
    assert (fresh.state, fresh.finished, fresh.reserved) == ("succeeded", 3, 3), (
        fresh.error,
        summary,
    )
    assert ran == 3, summary
    assert study.trials[0].state == TrialState.FAIL, summary
    assert len(finished(study)) == 3, summary  # the retry used the dead trial's slot
    retries = [t for t in finished(study) if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1, summary
    retry = retries[0]
    assert retry.params == study.trials[0].params
    assert {k: v for k, v in dead_params.items() if k in retry.params} == retry.params
    # same seed (and data order) as the attempt it replaces
    assert retry.user_attrs["seed"] == trial_seed(spec, dead.number)


def test_a_retry_does_not_carry_the_dead_workers_claim(tmp_path: Path) -> None:
    """Optuna's retry copies the failed trial's system attributes; the dead worker's claim is
    left out, so the retry shows no worker until one claims it."""
    env = make_env(tmp_path / "data", heartbeat_interval_s=1, heartbeat_grace_s=2)
    job = env.submit(random_spec(n_trials=2))
    hb_storage = make_storage(env.settings.resolved_database_url, env.settings, heartbeat=True)
    study = optuna.load_study(study_name=job.study_name, storage=hb_storage)
    dead = study.ask()
    hb_storage.set_trial_system_attr(dead._trial_id, WORKER_ATTR, "deadhost:1")
    hb_storage.record_heartbeat(dead._trial_id)
    time.sleep(3.3)  # stale: older than the 2 s grace in whole seconds (see above)
    fail_stale_trials(study)
    assert study.trials[dead.number].state == TrialState.FAIL
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["failed_trial"] == dead.number
    assert WORKER_ATTR not in retry.system_attrs
    assert study.trials[dead.number].system_attrs[WORKER_ATTR] == "deadhost:1"


@pytest.mark.parametrize(
    ("siblings", "complete", "running", "cap"),
    [
        (1, 0, 0, 5),  # one process: a first population of the 5 start-up trials
        (1, 2, 0, 3),
        (2, 0, 0, 3),  # the first of two processes takes its share ...
        (2, 0, 3, 2),  # ... the second the rest
        (2, 0, 5, 1),  # all running elsewhere: one trial, prunable once they complete
        (2, 2, 3, 1),
        (4, 0, 0, 2),
        (2, 5, 3, 1 << 30),  # start-up done: no cap
    ],
)
def test_processes_started_together_share_the_pruners_start_up_trials(
    siblings: int, complete: int, running: int, cap: int
) -> None:
    study = optuna.create_study(direction="maximize")
    for _ in range(complete):
        study.add_trial(optuna.trial.create_trial(value=0.5))
    for _ in range(running):
        study.ask()
    spec = JobSpec.model_validate(random_spec(pruner={"type": "median", "n_startup_trials": 5}))
    rt = SimpleNamespace(spec=spec, study=study)
    assert pruner_startup_cap(rt, siblings) == cap  # type: ignore[arg-type]
    no_pruner = SimpleNamespace(spec=JobSpec.model_validate(random_spec()), study=study)
    assert pruner_startup_cap(no_pruner, siblings) == 1 << 30  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("siblings", "finished_before", "population"),
    [
        (1, 0, 8),  # one process: P as configured
        (2, 0, 5),  # two processes: half of the 10 unfinished trials each
        (2, 4, 3),  # 6 left: 3 each
        (3, 0, 4),  # ceil(10 / 3)
        (2, 9, 1),  # one trial left
    ],
)
def test_processes_started_together_take_equal_shares_of_a_budgets_tail(
    tmp_path: Path, siblings: int, finished_before: int, population: int
) -> None:
    env = make_env(tmp_path, population=8, worker_siblings=siblings)
    job = env.submit(random_spec(n_trials=10))
    for _ in range(finished_before):
        env.jobs.record_finished(job.id)
    job = env.jobs.get(job.id)
    worker = env.worker()
    rt = worker.cache.get(job)
    assert sibling_share_cap(job, siblings) == -(-(10 - finished_before) // siblings)
    assert worker._population_size(job, rt) == population


@pytest.mark.parametrize(
    ("pruner", "n_trials", "device", "cap"),
    [
        ({"type": "median", "n_startup_trials": 5}, 48, "cpu", 11),  # 43 after start-up: 4 waves
        ({"type": "percentile", "percentile": 25.0, "n_startup_trials": 5}, 45, "cpu", 10),
        ({"type": "median", "n_startup_trials": 5}, 6, "cpu", 1),  # one trial after start-up
        ({"type": "median", "n_startup_trials": 5}, 5, "cpu", 1 << 30),  # nothing to prune
        ({"type": "median", "n_startup_trials": 5}, 48, "cuda", 1 << 30),  # a GPU stacks all
        (None, 48, "cpu", 1 << 30),  # no pruner: waves would buy nothing
    ],
)
def test_automatic_populations_on_cpu_come_in_waves_for_a_comparing_pruner(
    pruner: dict[str, Any] | None, n_trials: int, device: str, cap: int
) -> None:
    extra = {} if pruner is None else {"pruner": pruner}
    spec = JobSpec.model_validate(random_spec(n_trials=n_trials, **extra))
    rt = SimpleNamespace(spec=spec, device=torch.device(device))
    job = SimpleNamespace(n_trials=n_trials)
    assert pruner_wave_cap(job, rt) == cap  # type: ignore[arg-type]


@pytest.mark.parametrize(("siblings", "cap"), [(1, 11), (2, 6), (3, 4), (8, 2), (64, 1)])
def test_processes_started_together_share_each_wave(siblings: int, cap: int) -> None:
    """43 trials after the start-up ones: about PRUNER_WAVES waves in flight whatever the
    number of processes, each taking its share of a wave."""
    spec = JobSpec.model_validate(
        random_spec(n_trials=48, pruner={"type": "median", "n_startup_trials": 5})
    )
    rt = SimpleNamespace(spec=spec, device=torch.device("cpu"))
    job = SimpleNamespace(n_trials=48)
    assert pruner_wave_cap(job, rt, siblings) == cap  # type: ignore[arg-type]
    assert cap * siblings in range(-(-43 // PRUNER_WAVES), -(-43 // PRUNER_WAVES) + siblings)


def test_the_wave_cap_binds_automatic_populations_only(tmp_path: Path) -> None:
    spec = random_spec(n_trials=48, pruner={"type": "median", "n_startup_trials": 5})
    from service.submission import estimate_parameters
    from worker.population import auto_population_size

    # An explicit --population is the user's choice: the waves do not bind it.
    for population in (None, 32):
        env = make_env(tmp_path / str(population), population=population, device="cpu")
        job = env.submit(spec)
        for _ in range(5):  # the start-up trials are done: the start-up cap is lifted
            env.study(job).add_trial(optuna.trial.create_trial(value=0.5))
        worker = env.worker()
        rt = worker.cache.get(env.jobs.get(job.id))
        by_device = auto_population_size(
            estimate_parameters(rt.spec, rt.n_features, rt.n_classes),
            int(rt.data.X_train.shape[0]),
            rt.device,
        )
        expected = 32 if population else min(by_device, -(-43 // PRUNER_WAVES))
        assert worker._population_size(env.jobs.get(job.id), rt) == expected
    # Two processes started together share each automatic wave.
    env = make_env(tmp_path / "siblings", device="cpu", worker_siblings=2)
    job = env.submit(spec)
    for _ in range(5):
        env.study(job).add_trial(optuna.trial.create_trial(value=0.5))
    worker = env.worker()
    rt = worker.cache.get(env.jobs.get(job.id))
    assert worker._population_size(env.jobs.get(job.id), rt) == min(by_device, 6)


def test_an_idle_worker_on_sqlite_takes_a_submitted_job_without_waiting_for_its_poll(
    tmp_path: Path,
) -> None:
    """The poll interval is 60 s here, and so is the reaper's: only the submission's commit
    can wake the worker within seconds."""
    import threading

    env = make_env(tmp_path, poll_interval_s=60.0, heartbeat_interval_s=60, population=1)
    ready = threading.Event()
    worker = env.worker(on_ready=ready.set)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        time.sleep(0.3)  # idle: it has looked for work and found none
        submitted, submitted_at = time.monotonic(), time.time()
        job = env.submit(random_spec(n_trials=1, training={"max_epochs": 1}))
        while env.jobs.get(job.id).state != "succeeded":
            assert time.monotonic() - submitted < 30, env.jobs.get(job.id).state
            time.sleep(0.05)
        [trial] = env.study(job).trials
        assert trial.state == TrialState.COMPLETE and trial.datetime_start is not None
        # It started within seconds of the submission (a 60 s poll would not have looked yet;
        # the seconds are a busy CI's margin for loading the dataset, not the watch's 10 ms).
        assert trial.datetime_start.timestamp() - submitted_at < 5
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
