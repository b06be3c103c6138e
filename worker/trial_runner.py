"""Run one trial of a job: ask, train, tell. Exceptions map to trial states here and nowhere else.

Storage writes per trial: one intermediate value per epoch (``trial.report``), plus a constant
number at the end (user attributes, the tell, and the model artifact when the trial is a new best).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
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
from service.results import MODEL_ARTIFACT_ATTR
from service.states import JobState
from service.trial_attrs import set_user_attrs
from worker.runtime import JobRuntime
from worker.training import (
    EpochMetrics,
    TrialConfig,
    TrialResult,
    architecture_dict,
    evaluate,
    save_model,
    train_trial,
)
from worker.trial_config import resolve_config, trial_seed

log = logging.getLogger(__name__)

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


class JobStateProbe:
    """Answers "is the job still running?" between epochs with at most one query per interval,
    so a population of P members does not cost P queries per epoch."""

    def __init__(self, jobs: JobStore, job_id: str, interval_s: float = 0.5) -> None:
        self.jobs, self.job_id, self.interval_s = jobs, job_id, interval_s
        self._checked_at = -math.inf
        self._running = True

    def running(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= self.interval_s:
            self._running = self.jobs.get(self.job_id).state == JobState.RUNNING
            self._checked_at = now
        return self._running


@dataclass
class TrialContext:
    """Everything needed to run and finish one asked trial."""

    rt: JobRuntime
    jobs: JobStore
    artifact_store: FileSystemArtifactStore
    probe: JobStateProbe
    should_stop: Callable[[], bool]
    on_epoch: Callable[[int, EpochMetrics], None] | None = None


def ask(rt: JobRuntime) -> optuna.Trial:
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; we run the heartbeat
        # thread around ask/tell ourselves, which is exactly what optimize does.
        warnings.simplefilter("ignore", UserWarning)
        return rt.study.ask()


def prepare(rt: JobRuntime, trial: optuna.Trial) -> TrialConfig:
    """Sample the trial's parameters and resolve them into a TrialConfig."""
    params = suggest(rt.spec.resolved_space(), trial)
    return resolve_config(
        rt.spec, params, seed=trial_seed(rt.spec, original_number(rt.study, trial))
    )


def epoch_hook(ctx: TrialContext, trial: optuna.Trial) -> Callable[[EpochMetrics], None]:
    """Called after each epoch's validation: the one storage write per epoch (the intermediate
    value), then the reasons to stop: shutdown, cancellation, pruning."""
    objective = ctx.rt.spec.objective

    def hook(m: EpochMetrics) -> None:
        value = m.val_accuracy if objective == "val_accuracy" else m.val_loss
        if math.isfinite(value):
            trial.report(value, m.epoch)
        if ctx.on_epoch is not None:
            ctx.on_epoch(trial.number, m)
        if ctx.should_stop():
            raise WorkerStopping("worker is shutting down")
        if not ctx.probe.running():
            raise JobCancelled("job is no longer running")
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    return hook


def run_trial(ctx: TrialContext) -> TrialOutcome:
    """Run one trial for a job whose budget slot the caller has already reserved."""
    trial = ask(ctx.rt)
    with get_heartbeat_thread(trial._trial_id, ctx.rt.study._storage):
        try:
            config = prepare(ctx.rt, trial)
            result = train_trial(
                config, ctx.rt.data, device=ctx.rt.device, on_epoch=epoch_hook(ctx, trial)
            )
        except Exception as e:
            return finish_interrupted(ctx, trial, e)
        return finish(ctx, trial, result)


def finish_interrupted(ctx: TrialContext, trial: optuna.Trial, exc: BaseException) -> TrialOutcome:
    """Map the exception that ended a trial to its state (the one place this mapping lives)."""
    rt, jobs, number = ctx.rt, ctx.jobs, trial.number
    if isinstance(exc, optuna.TrialPruned):
        try:
            return _tell(rt, jobs, trial, TrialState.PRUNED, Outcome.PRUNED, reason=str(exc))
        except optuna.exceptions.UpdateFinishedTrialError:
            return TrialOutcome(Outcome.LOST, number, reason="finished elsewhere (stale heartbeat)")
    if isinstance(exc, JobCancelled):
        _fail(rt, jobs, trial, reason=f"cancelled: {exc}", counts_as_failure=False)
        return TrialOutcome(Outcome.CANCELLED, number, reason=str(exc))
    if isinstance(exc, WorkerStopping):
        _requeue(rt.study, trial, reason=str(exc))
        _fail(rt, jobs, trial, reason=f"requeued: {exc}", counts_as_failure=False)
        return TrialOutcome(Outcome.REQUEUED, number, reason=str(exc))
    # The trial's own failure: recorded on the trial and counted against the job.
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("trial %s of job %s failed: %s", number, rt.job_id, reason)
    _fail(rt, jobs, trial, reason=reason, counts_as_failure=True)
    return TrialOutcome(Outcome.FAILED, number, reason=reason)


def finish(ctx: TrialContext, trial: optuna.Trial, result: TrialResult) -> TrialOutcome:
    """Record a trained trial's result and tell it."""
    try:
        return _finish(ctx.rt, ctx.jobs, ctx.artifact_store, trial, result)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Our heartbeat went stale (e.g. SIGSTOP) and the trial was failed and retried elsewhere:
        # the late report is dropped so the trial is not counted twice.
        log.warning(
            "trial %s of job %s was finished elsewhere; late result dropped",
            trial.number,
            ctx.rt.job_id,
        )
        return TrialOutcome(
            Outcome.LOST, trial.number, reason="finished elsewhere (stale heartbeat)"
        )


def _finish(
    rt: JobRuntime,
    jobs: JobStore,
    artifact_store: FileSystemArtifactStore,
    trial: optuna.Trial,
    result: TrialResult,
) -> TrialOutcome:
    study = rt.study
    attrs = _result_attrs(result, target=rt.spec.training.target_accuracy)
    if result.diverged:
        # Diverged: stopped at once, recorded as PRUNED with the reason; only COMPLETE trials are
        # ranked, so it can never be the best trial, and it uses its budget slot like any result.
        set_user_attrs(study, trial, attrs)
        return _tell(
            rt, jobs, trial, TrialState.PRUNED, Outcome.DIVERGED, reason=result.diverged_reason
        )
    value = result.best_value
    if value is None:  # no epoch finished (cannot happen with max_epochs >= 1); never ranked
        return _tell(rt, jobs, trial, TrialState.PRUNED, Outcome.PRUNED, reason="no epoch finished")
    if _is_new_best(study, value):
        attrs.update(_save_best(rt, trial, result, artifact_store))
    set_user_attrs(study, trial, attrs)
    return _tell(rt, jobs, trial, value, Outcome.COMPLETE, value=value)


def _result_attrs(result: TrialResult, *, target: float | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "history": result.history,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "n_parameters": result.n_parameters,
        "duration_s": round(result.duration_s, 4),
        "seed": result.seed,
        "best_val_accuracy": result.best_val_accuracy,
        "best_val_loss": result.best_val_loss,
    }
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    if best is not None:
        # The lectures' overfitting measure: train minus validation accuracy at the kept epoch.
        attrs["train_val_gap"] = best["train_accuracy"] - best["val_accuracy"]
        attrs["best_train_accuracy"] = best["train_accuracy"]
    if target is not None:
        attrs["epochs_to_target"] = next(
            (h["epoch"] for h in result.history if h["val_accuracy"] >= target), None
        )
    if result.diverged:
        attrs["diverged"] = True
        attrs["diverged_reason"] = result.diverged_reason
    return attrs


def _is_new_best(study: optuna.Study, value: float) -> bool:
    try:
        best = study.best_value
    except ValueError:  # no complete trial yet
        return True
    return value > best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value < best


def _save_best(
    rt: JobRuntime, trial: optuna.Trial, result: TrialResult, store: FileSystemArtifactStore
) -> dict[str, Any]:
    """A new best: touch the test split (only for best trials) and keep its weights."""
    attrs: dict[str, Any] = {}
    if rt.data.X_test.shape[0] > 0:
        test_loss, test_acc = evaluate(result.model, rt.data.X_test, rt.data.y_test)
        attrs["test_accuracy"] = test_acc
        attrs["test_loss"] = test_loss
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
    attrs[MODEL_ARTIFACT_ATTR] = artifact_id
    return attrs


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
        set_user_attrs(rt.study, trial, {"fail_reason": reason})
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
