"""Run one trial of a job: ask, train, tell. Exceptions map to trial states here and nowhere else.

Storage writes per trial: one intermediate value per epoch (``trial.report``), plus a constant
number at the end (user attributes, the tell, and the model artifact when the trial is a new best).
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from search_spaces.sampling import suggest
from service.db import JobStore
from service.states import JobState
from worker.runtime import JobRuntime
from worker.training import (
    EpochMetrics,
    TrialResult,
    architecture_dict,
    evaluate,
    save_model,
    train_trial,
)
from worker.trial_config import resolve_config, trial_seed

log = logging.getLogger(__name__)

MODEL_ARTIFACT_ATTR = "model_artifact_id"
REQUEUED_FROM_ATTR = "failed_trial"  # same key as Optuna's retry callback: the original number


class JobCancelled(Exception):
    """The job was cancelled; raised between epochs."""


class WorkerStopping(Exception):
    """The worker got SIGTERM; the trial is failed and re-queued with the same parameters."""


class Outcome(StrEnum):
    COMPLETE = "complete"
    PRUNED = "pruned"
    DIVERGED = "diverged"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"
    LOST = "lost"  # the trial was failed by someone else (stale heartbeat) while we ran it


@dataclass
class TrialOutcome:
    outcome: Outcome
    number: int
    value: float | None = None
    reason: str | None = None


def original_number(study: optuna.Study, trial: optuna.Trial) -> int:
    """The number of the first attempt of this trial (a retry keeps its seed and data order)."""
    sa = study._storage.get_trial_system_attrs(trial._trial_id)
    return int(sa.get(REQUEUED_FROM_ATTR, trial.number))


def run_trial(
    rt: JobRuntime,
    jobs: JobStore,
    artifact_store: FileSystemArtifactStore,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
) -> TrialOutcome:
    """Run one trial for a job whose budget slot the caller has already reserved."""
    study = rt.study
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; we run the heartbeat
        # thread around ask/tell ourselves, which is exactly what optimize does.
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    with get_heartbeat_thread(trial._trial_id, study._storage):
        return _run_asked(rt, jobs, artifact_store, trial, should_stop, on_epoch)


def _run_asked(
    rt: JobRuntime,
    jobs: JobStore,
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Trial,
    should_stop: Callable[[], bool],
    on_epoch: Callable[[int, EpochMetrics], None] | None,
) -> TrialOutcome:
    study, spec = rt.study, rt.spec
    number = trial.number
    try:
        params = suggest(spec.resolved_space(), trial)
        config = resolve_config(spec, params, seed=trial_seed(spec, original_number(study, trial)))

        def epoch_hook(m: EpochMetrics) -> None:
            value = m.val_accuracy if spec.objective == "val_accuracy" else m.val_loss
            if math.isfinite(value):
                trial.report(value, m.epoch)
            if on_epoch is not None:
                on_epoch(number, m)
            if should_stop():
                raise WorkerStopping("worker is shutting down")
            if jobs.get(rt.job_id).state != JobState.RUNNING:
                raise JobCancelled("job is no longer running")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

        result = train_trial(config, rt.data, device=rt.device, on_epoch=epoch_hook)
    except optuna.TrialPruned as e:
        try:
            return _tell(rt, jobs, trial, TrialState.PRUNED, Outcome.PRUNED, reason=str(e))
        except optuna.exceptions.UpdateFinishedTrialError:
            return TrialOutcome(Outcome.LOST, number, reason="finished elsewhere (stale heartbeat)")
    except JobCancelled as e:
        _fail(rt, jobs, trial, reason=f"cancelled: {e}", counts_as_failure=False)
        return TrialOutcome(Outcome.CANCELLED, number, reason=str(e))
    except WorkerStopping as e:
        _requeue(study, trial, reason=str(e))
        _fail(rt, jobs, trial, reason=f"requeued: {e}", counts_as_failure=False)
        return TrialOutcome(Outcome.REQUEUED, number, reason=str(e))
    except Exception as e:  # the trial's own failure: recorded on the trial and counted
        reason = f"{type(e).__name__}: {e}"
        log.warning("trial %s of job %s failed: %s", number, rt.job_id, reason)
        _fail(rt, jobs, trial, reason=reason, counts_as_failure=True)
        return TrialOutcome(Outcome.FAILED, number, reason=reason)

    try:
        return _finish(rt, jobs, artifact_store, trial, result)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Our heartbeat went stale (e.g. SIGSTOP) and the trial was failed and retried elsewhere:
        # the late report is dropped so the trial is not counted twice.
        log.warning(
            "trial %s of job %s was finished elsewhere; late result dropped", number, rt.job_id
        )
        return TrialOutcome(Outcome.LOST, number, reason="finished elsewhere (stale heartbeat)")


def _finish(
    rt: JobRuntime,
    jobs: JobStore,
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Trial,
    result: TrialResult,
) -> TrialOutcome:
    study = rt.study
    _record_attrs(trial, result, target=rt.spec.training.target_accuracy)
    if result.diverged:
        # Diverged: stopped at once, recorded as PRUNED with the reason; only COMPLETE trials are
        # ranked, so it can never be the best trial, and it uses its budget slot like any result.
        trial.set_user_attr("diverged", True)
        trial.set_user_attr("diverged_reason", result.diverged_reason)
        return _tell(
            rt, jobs, trial, TrialState.PRUNED, Outcome.DIVERGED, reason=result.diverged_reason
        )
    value = result.best_value
    if value is None:  # no epoch finished (cannot happen with max_epochs >= 1); never ranked
        return _tell(rt, jobs, trial, TrialState.PRUNED, Outcome.PRUNED, reason="no epoch finished")
    if _is_new_best(study, value):
        _save_best(rt, trial, result, artifact_store)
    return _tell(rt, jobs, trial, value, Outcome.COMPLETE, value=value)


def _record_attrs(trial: optuna.Trial, result: TrialResult, *, target: float | None = None) -> None:
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    if best is not None:
        # The lectures' overfitting measure: train minus validation accuracy at the kept epoch.
        trial.set_user_attr("train_val_gap", best["train_accuracy"] - best["val_accuracy"])
        trial.set_user_attr("best_train_accuracy", best["train_accuracy"])
    if target is not None:
        reached = next((h["epoch"] for h in result.history if h["val_accuracy"] >= target), None)
        trial.set_user_attr("epochs_to_target", reached)
    trial.set_user_attr("history", result.history)
    trial.set_user_attr("epochs_run", result.epochs_run)
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr("stopped_early", result.stopped_early)
    trial.set_user_attr("n_parameters", result.n_parameters)
    trial.set_user_attr("duration_s", round(result.duration_s, 4))
    trial.set_user_attr("seed", result.seed)
    trial.set_user_attr("best_val_accuracy", result.best_val_accuracy)
    trial.set_user_attr("best_val_loss", result.best_val_loss)


def _is_new_best(study: optuna.Study, value: float) -> bool:
    try:
        best = study.best_value
    except ValueError:  # no complete trial yet
        return True
    return value > best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value < best


def _save_best(
    rt: JobRuntime, trial: optuna.Trial, result: TrialResult, store: FileSystemArtifactStore
) -> None:
    """A new best: touch the test split (only for best trials) and keep its weights."""
    if rt.data.X_test.shape[0] > 0:
        test_loss, test_acc = evaluate(result.model, rt.data.X_test, rt.data.y_test)
        trial.set_user_attr("test_accuracy", test_acc)
        trial.set_user_attr("test_loss", test_loss)
    cfg = resolve_config(rt.spec, trial.params | _fixed_params(rt), seed=result.seed)
    arch = architecture_dict(rt.n_features, rt.n_classes, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trial-{trial.number}.safetensors"
        save_model(result.model, arch, path)
        artifact_id = upload_artifact(
            artifact_store=store,
            file_path=str(path),
            study_or_trial=trial,
            mimetype="application/octet-stream",
        )
    trial.set_user_attr(MODEL_ARTIFACT_ATTR, artifact_id)


def _fixed_params(rt: JobRuntime) -> dict[str, Any]:
    from search_spaces import FixedParam

    return {
        n: p.value
        for n, p in rt.spec.resolved_space().parameters.items()
        if isinstance(p, FixedParam)
    }


def _tell(
    rt: JobRuntime,
    jobs: JobStore,
    trial: optuna.Trial,
    value_or_state: float | TrialState,
    outcome: Outcome,
    *,
    value: float | None = None,
    reason: str | None = None,
) -> TrialOutcome:
    if isinstance(value_or_state, TrialState):
        rt.study.tell(trial, state=value_or_state)
    else:
        rt.study.tell(trial, value_or_state)
    job = jobs.record_finished(rt.job_id)
    if job.finished >= job.n_trials:
        jobs.try_transition(rt.job_id, JobState.SUCCEEDED)
    return TrialOutcome(outcome, trial.number, value=value, reason=reason)


def _fail(
    rt: JobRuntime, jobs: JobStore, trial: optuna.Trial, *, reason: str, counts_as_failure: bool
) -> None:
    try:
        trial.set_user_attr("fail_reason", reason)
        rt.study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # already failed by the stale-trial reaper, which released the slot
    jobs.release_slot(rt.job_id, failed=counts_as_failure)


def _requeue(study: optuna.Study, trial: optuna.Trial, *, reason: str) -> None:
    """Put the trial's parameters back as WAITING so the next worker runs them (same seed)."""
    frozen = study._storage.get_trial(trial._trial_id)
    system_attrs = {**frozen.system_attrs}
    system_attrs.setdefault(REQUEUED_FROM_ATTR, frozen.number)
    system_attrs["requeue_reason"] = reason
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            system_attrs=system_attrs,
        )
    )
