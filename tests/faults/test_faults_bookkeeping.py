"""The bookkeeping that keeps a job consistent when a step is repeated or raced: a storage write
retried after its answer was lost, a late tell racing the reaper, a trial that keeps killing
its workers. In-process (one Worker object, real SQLite file), so each case is exact and fast."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from service.config import Settings
from service.db import JobStore
from service.states import JobState
from service.trial_attrs import Tell, fail_trial, tell_trials
from tests.faults._harness import FaultEnv, small_spec
from worker.loop import Worker
from worker.trial_runner import requeue_trial, sync_finished

GRACE = 1
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def _worker(env: FaultEnv, **over: Any) -> Worker:
    settings = env.settings.model_copy(
        update={"heartbeat_interval_s": 1, "heartbeat_grace_s": GRACE, "population": 1, **over}
    )
    return Worker(settings, once=True)


def _start_trial(w: Worker, job_id: str) -> tuple[optuna.Study, optuna.Trial]:
    """What a worker does before training: reserve a slot, ask, beat once."""
    job = w.jobs.get(job_id)
    assert w.jobs.reserve_slot(job.id)
    study = optuna.load_study(study_name=job.study_name, storage=w.storage)
    trial = study.ask()
    w.storage.record_heartbeat(trial._trial_id)
    return study, trial


@pytest.mark.slow
@pytest.mark.parametrize("grid", [False, True], ids=["random", "grid"])
def test_a_trial_that_keeps_killing_its_workers_fails_the_job(
    sqlite_env: FaultEnv, grid: bool
) -> None:
    """Stale (crashed) attempts are retried up to max_trial_retries; beyond that each counts as
    a failure of the job, so an OOM-killer loop ends at max_trial_failures with the reason. A
    grid point is re-queued even then (the grid stays complete while the job lives)."""
    env = sqlite_env
    job = env.submit(small_spec("crashy", n_trials=4, grid=grid))
    w = _worker(env, max_trial_retries=1, max_trial_failures=2)
    env.jobs.transition(job.id, JobState.RUNNING)
    for _round in range(2):  # every trial crashes twice: the first try and its one retry
        for _ in range(4 if grid else 2):
            _start_trial(w, job.id)
        time.sleep(GRACE + 1.2)
        w.reap(force=True)
    j = env.job(job.id)
    assert j.state == "failed", env.describe(job)
    assert j.failures >= 2 and "lost its worker 2 times" in (j.error or ""), j.error
    assert j.reserved == 0  # every slot came back
    trials = env.trials(job)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    if grid:  # the twice-crashed grid points are waiting again, nothing was lost
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert len(waiting) == j.n_trials


def test_fail_trial_is_idempotent_and_yields_to_the_reaper(sqlite_env: FaultEnv) -> None:
    env = sqlite_env
    job = env.submit(small_spec("fail"))
    w = _worker(env)
    study, trial = _start_trial(w, job.id)
    assert fail_trial(study, trial._trial_id, "requeued: worker is shutting down")
    # Repeated after a lost answer: still ours, and nothing changes.
    assert fail_trial(study, trial._trial_id, "requeued: worker is shutting down")
    # A trial the reaper failed first (no reason written) is not ours to re-queue.
    _, other = _start_trial(w, job.id)
    w.storage.set_trial_state_values(other._trial_id, TrialState.FAIL)
    assert not fail_trial(study, other._trial_id, "requeued: worker is shutting down")


def test_requeue_is_made_once(sqlite_env: FaultEnv) -> None:
    env = sqlite_env
    job = env.submit(small_spec("requeue"))
    w = _worker(env)
    study, trial = _start_trial(w, job.id)
    trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
    assert fail_trial(study, trial._trial_id, "requeued: test")
    requeue_trial(study, trial._trial_id, reason="requeued: test")
    requeue_trial(study, trial._trial_id, reason="requeued: test")  # retried after a lost answer
    waiting = [t for t in env.trials(job) if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == env.trial(job, trial.number).params


def test_a_late_tell_is_lost_and_a_repeated_tell_is_not_counted_twice(
    sqlite_env: FaultEnv,
) -> None:
    env = sqlite_env
    job = env.submit(small_spec("tell", n_trials=2))
    w = _worker(env)
    study, late = _start_trial(w, job.id)
    w.storage.set_trial_state_values(late._trial_id, TrialState.FAIL)  # the reaper was first
    assert tell_trials(study, [Tell(late._trial_id, TrialState.COMPLETE, 0.9)]) == [False]
    _, ok = _start_trial(w, job.id)
    told = Tell(ok._trial_id, TrialState.COMPLETE, 0.8)
    assert tell_trials(study, [told]) == [True]
    assert tell_trials(study, [told]) == [True]  # a retry after a lost answer: already ours
    j = sync_finished(study, env.jobs, job.id)
    j = sync_finished(study, env.jobs, job.id)
    assert j.finished == 1
    assert [t.state for t in env.trials(job)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_finished_count_is_restored_from_the_study(sqlite_env: FaultEnv, tmp_path: Path) -> None:
    """A worker that died between its tell and its count: the reaper's settle restores it and
    finishes the job (sync_finished only ever raises the count to the study's)."""
    env = sqlite_env
    job = env.submit(small_spec("count", n_trials=1))
    w = _worker(env)
    env.jobs.transition(job.id, JobState.RUNNING)
    study, trial = _start_trial(w, job.id)
    study.tell(trial, 0.7)  # ... and the process died before counting it
    assert env.job(job.id).finished == 0
    w.reap(force=True)  # the first reap of a worker settles every running job
    j = env.job(job.id)
    assert j.finished == 1 and j.state == "succeeded"
    assert JobStore(env.engine).sync_finished(job.id, 0).finished == 1  # never lowered
    assert isinstance(env.settings, Settings)


def test_a_failure_its_worker_did_not_finish_is_settled_once_by_the_reaper(
    sqlite_env: FaultEnv,
) -> None:
    """A worker died after failing its trial (the failure counts against the job) and before
    re-queueing it or giving its slot back: the next reaper, once heartbeat_grace_s has passed,
    re-queues it and releases the slot counting the failure, once however often it reaps; a
    job at max_trial_failures fails with the trial's reason. The copy carries none of the
    attempt's bookkeeping, so its own failure is settled on its own."""
    env = sqlite_env
    job = env.submit(small_spec("settle", grid=True))
    w = _worker(env, max_trial_failures=1)
    env.jobs.transition(job.id, JobState.RUNNING)
    study, trial = _start_trial(w, job.id)
    assert fail_trial(
        study, trial._trial_id, "ValueError: boom", requeue=True, counts_as_failure=True
    )  # ... and the process died here
    w.reap(force=True)  # within the grace: left to the failing worker
    assert env.job(job.id).reserved == 1
    time.sleep(GRACE + 0.2)
    for _ in range(2):  # each new worker's first reap settles every running job
        _worker(env, max_trial_failures=1).reap(force=True)
    j = env.job(job.id)
    assert (j.reserved, j.failures, j.state) == (0, 1, "failed"), env.describe(job)
    assert "ValueError: boom" in (j.error or "")
    copies = [t for t in env.trials(job) if t.system_attrs.get("hpo_requeue_of") == trial.number]
    assert len(copies) == 1 and copies[0].state == TrialState.WAITING
    assert not {"hpo_fail_settle", "hpo_slot_released"} & copies[0].system_attrs.keys()
    # The worker, had it lived (or come back from an outage), finds its steps done already.
    requeue_trial(study, trial._trial_id, reason="ValueError: boom")
    assert not env.jobs.release_slot(job.id, failed=True, trial_id=trial._trial_id)
    j = env.job(job.id)
    assert (j.reserved, j.failures) == (0, 1)
    assert [
        t.number for t in env.trials(job) if t.system_attrs.get("hpo_requeue_of") == trial.number
    ] == [copies[0].number]
