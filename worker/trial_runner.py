"""Run one trial of a job: ask, train, tell. Exceptions map to trial states here and nowhere else.

Storage writes per trial: one at the start (the claim and every sampled parameter), one
intermediate value per epoch (``trial.report``), plus a constant number at the end (user
attributes, the tell, and the model artifact when the trial is a new best).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search_spaces.sampling import suggest
from service import defaults
from service.db import Job, JobStore
from service.db.retry import Backoff, call_with_retry, describe, is_transient
from service.results import MODEL_ARTIFACT_ATTR
from service.states import JobState
from service.studies import (
    WORKER_ATTR,
    best_complete_value,
    completed_trial_ids,
    count_finished_trials,
    learning_curves,
    waiting_trial_ids,
)
from service.trial_attrs import (
    ATTEMPT_ATTRS,
    REQUEUE_OF_ATTR,
    REQUEUED_ATTR,
    PendingParam,
    Tell,
    add_requeued_copy,
    claim_waiting_trial,
    fail_trial,
    held_params,
    new_trials,
    record_heartbeats,
    set_intermediate_values,
    start_trial,
    start_trials,
    tell_trials,
)
from worker.epoch_reports import EpochReports
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
    # The database stayed away longer than storage_retry_s: the trial is left RUNNING with its
    # heartbeat stopped, so the stale-trial reaper fails and re-queues it once the database is back.
    ABANDONED = "abandoned"


@dataclass
class TrialOutcome:
    outcome: Outcome
    number: int
    value: float | None = None
    reason: str | None = None


def original_number(trial: optuna.Trial) -> int:
    """The number of the first attempt of this trial (a retry keeps its seed and data order).

    Read from the trial as ``ask`` loaded it: a re-queued copy is created WAITING with this
    attribute, which nothing changes afterwards, so no storage read is needed."""
    sa = trial._cached_frozen_trial.system_attrs
    return int(sa.get(REQUEUED_FROM_ATTR, trial.number))


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """One thread that beats for the given trials every heartbeat interval until stopped.

    Unlike Optuna's own heartbeat thread, a failed beat (the database is away) is logged and tried
    again at the next beat instead of ending the thread: a trial that rides out an outage must
    still look alive when the database comes back.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: list[int]) -> None:
        self.storage = storage
        self.trial_ids = trial_ids
        self.interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drop(self, trial_ids: Iterable[int]) -> None:
        """Beat no more for these trials: settled ones need no beat, and one abandoned to the
        reaper (the database stayed away) must go stale for the reaper to take it while the
        rest of its stack trains on. The list is replaced, not changed: the beat thread reads
        it once per beat."""
        gone = set(trial_ids)
        self.trial_ids = [t for t in self.trial_ids if t not in gone]

    def _beat(self) -> None:
        assert self.interval is not None
        failing = False
        while True:
            try:
                if self.trial_ids:
                    record_heartbeats(self.storage, self.trial_ids)
                if failing:
                    log.info("heartbeat of trials %s recorded again", self.trial_ids)
                failing = False
            except Exception as e:
                if not failing:
                    log.warning("heartbeat of trials %s failed: %s", self.trial_ids, describe(e))
                failing = True
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._beat, name="hpo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _TrainingGate:
    """Whether the main thread is inside training proper, where a stop deadline (SIGTERM, then
    the stop grace period running out) may interrupt it mid-epoch. Storage writes, the epoch hook
    and the finishing of a trial are never interrupted, so they cannot be left half done."""

    training = False


TRAINING_GATE = _TrainingGate()


@contextmanager
def _gate(training: bool) -> Iterator[None]:
    previous = TRAINING_GATE.training
    TRAINING_GATE.training = training
    try:
        yield
    finally:
        TRAINING_GATE.training = previous


def interruptible() -> AbstractContextManager[None]:
    """Mark training code that the stop deadline may interrupt (raising WorkerStopping)."""
    return _gate(True)


def uninterruptible() -> AbstractContextManager[None]:
    return _gate(False)


class JobStateProbe:
    """Answers "is the job still running?" between epochs with at most one query per interval,
    so a population of P members does not cost P queries per epoch."""

    def __init__(self, jobs: JobStore, job_id: str, interval_s: float = 0.5) -> None:
        self.jobs, self.job_id, self.interval_s = jobs, job_id, interval_s
        self._checked_at = -math.inf
        self._running = True

    def running(self, *, fresh: bool = False) -> bool:
        """``fresh``: ask the database now (before starting a stack: one query is far cheaper
        than training a stack of a cancelled job for an epoch)."""
        now = time.monotonic()
        if fresh or now - self._checked_at >= self.interval_s:
            self._running = self.jobs.state(self.job_id) == JobState.RUNNING
            self._checked_at = now
        return self._running


class PruningSnapshot:
    """One read of the study's finished trials per epoch, shared by a population's members.

    Optuna's percentile and median pruners read every COMPLETE trial (with all its intermediate
    values) on each check; the members of a population check one after another at the same
    epoch, so the first check of an epoch reads and the others reuse it (measured before this:
    7 ms per read on SQLite with 48 trials, one read per member per epoch). A trial that another
    worker completes between two members' checks counts from the next epoch on: the snapshot
    any concurrent reader sees. The read is one query for the COMPLETE trials' ids
    (``completed_trial_ids``) and, for those finished since the previous read, one for their
    learning curves (``learning_curves``): a finished trial's curve never changes, so the
    curves read are kept for the snapshot's life (reading every curve each epoch was 1.3 ms
    in the bench's population run, its largest storage item). That is all these pruners look
    at. Other pruners (successive halving and hyperband record rung promotions as they go)
    check the study itself, as ``Trial.should_prune`` does.
    """

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._completed: list[optuna.trial.FrozenTrial] | None = None
        self._curves: dict[int, dict[int, float]] = {}  # by trial id; finished ones never change

    def reset(self) -> None:
        """Forget the snapshot: trials finished since (a previous stack's) count from now on."""
        self._epoch = None
        self._completed = None

    def should_prune(self, trial: optuna.Trial, epoch: int) -> bool:
        study = trial.study
        if not isinstance(study.pruner, optuna.pruners.PercentilePruner):  # MedianPruner too
            return trial.should_prune()
        if epoch != self._epoch or self._completed is None:
            self._completed = self._read(study)
            self._epoch = epoch
        # What Trial.should_prune passes: the trial's locally kept state, no storage read.
        latest = trial._get_latest_trial()
        snapshot = cast(optuna.Study, _CompletedSnapshot(study, self._completed))  # duck-typed
        return study.pruner.prune(snapshot, latest)

    def _read(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        ids = completed_trial_ids(study._storage, study._study_id)
        if ids is None:  # not an RDB storage
            return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        new = [trial_id for trial_id in ids if trial_id not in self._curves]
        if new:
            self._curves.update(learning_curves(study._storage, new))
        return [cast(optuna.trial.FrozenTrial, _Curve(self._curves[i])) for i in ids]  # duck-typed


@dataclass
class _Curve:
    """A COMPLETE trial as the percentile pruner reads it: its intermediate values only."""

    intermediate_values: dict[int, float]
    state: TrialState = TrialState.COMPLETE


class _CompletedSnapshot:
    """The study as the percentile pruner sees it, with ``get_trials`` answered from a snapshot."""

    def __init__(self, study: optuna.Study, completed: list[optuna.trial.FrozenTrial]) -> None:
        self._study = study
        self._completed = completed

    def get_trials(
        self, deepcopy: bool = True, states: tuple[TrialState, ...] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        if states != (TrialState.COMPLETE,):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        return [copy.deepcopy(t) for t in self._completed] if deepcopy else self._completed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


@dataclass
class TrialContext:
    """Everything needed to run and finish one asked trial (or a population of them)."""

    rt: JobRuntime
    jobs: JobStore
    artifact_store: FileSystemArtifactStore
    probe: JobStateProbe
    should_stop: Callable[[], bool]
    on_epoch: Callable[[int, EpochMetrics], None] | None = None
    # How long a storage write of a running trial is retried while the database is away.
    storage_retry_s: float = defaults.STORAGE_RETRY_S
    pruning: PruningSnapshot = field(default_factory=PruningSnapshot)
    # A population counts its told trials into the job once, after the last of them
    # (count_finished_into_job), instead of two statements per member; a crash in between is
    # repaired by the reaper, which settles a job's count from its study.
    defer_job_count: bool = False
    # Epoch reports wait here between writes (see worker.epoch_reports); run_trial and
    # run_population give their trials one. None: each epoch's value is written at once.
    reports: EpochReports | None = None
    report_interval_s: float = defaults.EPOCH_REPORT_INTERVAL_S
    # When a storage call of these trials last gave up on the database (monotonic seconds),
    # until one succeeds again. A stack's members retry their own writes one after another,
    # so an allowance per call would stall a stack for P x storage_retry_s in one outage
    # (500 x 60 s by default for a GPU stack); the outage is one, and so is its allowance.
    outage_since: float | None = field(default=None, repr=False)

    def retry(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn`` with retries while the database is away, for what is left of
        ``storage_retry_s`` since the outage began (at least one try)."""
        started = time.monotonic()
        allowance = self.storage_retry_s
        if self.outage_since is not None:
            allowance = max(0.0, allowance - (started - self.outage_since))
        try:
            result = call_with_retry(fn, deadline_s=allowance, what=what)
        except Exception as e:
            if is_transient(e) and self.outage_since is None:
                self.outage_since = started
            raise
        self.outage_since = None
        return result


def ask(rt: JobRuntime, claimed: list[int] | None = None) -> optuna.Trial:
    """``Study.ask``: the oldest WAITING trial that this worker manages to claim, else a new one
    (``ask_population`` for one trial)."""
    return ask_population(rt, 1, claimed=claimed)[0]


def ask_population(
    rt: JobRuntime, n: int, waiting: list[int] | None = None, claimed: list[int] | None = None
) -> list[optuna.Trial]:
    """``Study.ask`` up to n times: WAITING trials first, oldest first, each claimed on its own
    (a trial that another worker claims or finishes first is skipped), then the new ones
    created in one transaction (``new_trials``).

    ``waiting``: ids from ``waiting_trial_ids`` (claimed ones are removed); None looks them up.
    Optuna's own ask finds WAITING trials by reading every unfinished trial, so P asks would
    read O(P^2) trials (see ``waiting_trial_ids``). If claiming or creating fails after some
    WAITING trials were claimed, those are returned (fewer than n: the caller gives back the
    other budget slots); with none claimed the error propagates.

    ``claimed``: a list this call appends the id of each WAITING trial it claims to, so that a
    caller whose ask raised anyway (reading a claimed trial failed) gives back only the slots
    of the trials that were not claimed: a claimed trial stays RUNNING, and the stale-trial
    reaper fails it, re-queues it and frees its slot (giving that slot back here too would
    free it twice, and the job would overshoot its budget).
    """
    study = rt.study
    storage = study._storage
    if waiting is None:
        waiting = waiting_trial_ids(storage, study._study_id)
    ids: list[int] = [] if claimed is None else claimed
    try:
        while len(ids) < n and (trial_id := _claim_waiting(storage, waiting)) is not None:
            ids.append(trial_id)
    except Exception as e:
        if not ids:
            raise
        log.warning("job %s: claiming waiting trials failed (%s)", rt.job_id, describe(e))
        n = len(ids)  # no new trials either: return what is claimed
    study._thread_local.cached_all_trials = None  # as Study.ask: claimed trials, a fresh view
    trials = [optuna.Trial(study, trial_id) for trial_id in ids]  # read: fixed parameters
    try:
        trials += new_trials(study, n - len(ids))
    except Exception as e:
        if not ids:
            raise
        log.warning("job %s: new trials could not be created (%s)", rt.job_id, describe(e))
    return trials


def _claim_waiting(storage: optuna.storages.BaseStorage, waiting: list[int]) -> int | None:
    """The first of ``waiting`` (removed as tried) that this worker turns RUNNING, if any: a
    trial that another worker claims or finishes first is skipped."""
    while waiting:
        candidate = waiting.pop(0)
        try:
            if claim_waiting_trial(storage, candidate):
                return candidate
        except UpdateFinishedTrialError:
            continue
    return None


def release_unasked(ctx: TrialContext, n: int = 1) -> None:
    """Give back budget slots reserved for trials that were never asked (ask itself failed)."""
    release_slots(ctx.jobs, ctx.rt.job_id, n, ctx.storage_retry_s)


def release_slots(jobs: JobStore, job_id: str, n: int, storage_retry_s: float) -> None:
    """Give back ``n`` reserved budget slots, riding out a database outage of up to
    ``storage_retry_s`` (what made the caller release is often that outage): a slot that is
    never given back keeps the job from ever reaching its budget."""
    for _ in range(n):
        try:
            call_with_retry(
                lambda: jobs.release_slot(job_id),
                deadline_s=storage_retry_s,
                what=f"releasing a budget slot of job {job_id}",
            )
        except Exception as e:
            log.error("job %s: a budget slot could not be released: %s", job_id, describe(e))


def prepare(ctx: TrialContext, trial: optuna.Trial) -> TrialConfig:
    """Sample the trial's parameters and resolve them into a TrialConfig.

    The parameters are written together with the claim (which worker runs the trial, shown in
    the dashboard's system attributes) in one transaction: a trial is never seen claimed with
    only some of its parameters, and it costs one commit, not one per parameter plus one.
    """
    rt = ctx.rt
    pending, params = _sample(rt, trial)
    ctx.retry(
        lambda: start_trial(rt.study, trial, {WORKER_ATTR: worker_identity()}, pending),
        f"claiming trial {trial.number}",
    )
    return _resolve(rt, trial, params)


def prepare_population(
    ctx: TrialContext, trials: Sequence[optuna.Trial]
) -> tuple[list[tuple[optuna.Trial, TrialConfig]], dict[int, TrialOutcome]]:
    """``prepare`` for a population's trials, claimed in one transaction (``start_trials``).

    Returns the prepared trials and the outcomes of those that could not be prepared (each
    finished as ``prepare``'s caller would finish it). Sampling them all before claiming any
    draws the same values: the samplers read finished trials only (no constant liar). When a
    trial cannot be claimed (finished elsewhere meanwhile) the batch writes nothing and each
    is claimed on its own, so only that one fails.
    """
    rt = ctx.rt
    outcomes: dict[int, TrialOutcome] = {}
    sampled: list[tuple[optuna.Trial, list[PendingParam], dict[str, Any]]] = []
    for trial in trials:
        try:
            sampled.append((trial, *_sample(rt, trial)))
        except Exception as e:
            outcomes[trial.number] = finish_interrupted(ctx, trial, e)
    attrs = {WORKER_ATTR: worker_identity()}
    claimed = sampled
    try:
        ctx.retry(
            lambda: start_trials(rt.study, [(t, attrs, pending) for t, pending, _ in sampled]),
            f"claiming {len(sampled)} trials",
        )
    except (UpdateFinishedTrialError, KeyError):
        claimed = []
        for trial, pending, params in sampled:
            try:
                ctx.retry(
                    lambda t=trial, p=pending: start_trial(rt.study, t, attrs, p),  # type: ignore[misc]
                    f"claiming trial {trial.number}",
                )
                claimed.append((trial, pending, params))
            except Exception as e:
                outcomes[trial.number] = finish_interrupted(ctx, trial, e)
    except Exception as e:  # the database stayed away, a parameter clashes: none can start
        for trial, _, _ in sampled:
            outcomes[trial.number] = finish_interrupted(ctx, trial, e)
        claimed = []
    prepared: list[tuple[optuna.Trial, TrialConfig]] = []
    for trial, _, params in claimed:
        try:
            prepared.append((trial, _resolve(rt, trial, params)))
        except Exception as e:
            outcomes[trial.number] = finish_interrupted(ctx, trial, e)
    return prepared, outcomes


def _sample(rt: JobRuntime, trial: optuna.Trial) -> tuple[list[PendingParam], dict[str, Any]]:
    """The trial's parameters, sampled with their storage writes held back (``held_params``)."""
    with held_params(trial) as pending:
        params = suggest(rt.spec.resolved_space(), trial)
    return pending, params


def _resolve(rt: JobRuntime, trial: optuna.Trial, params: dict[str, Any]) -> TrialConfig:
    return resolve_config(rt.spec, params, seed=trial_seed(rt.spec, original_number(trial)))


def epoch_hook(ctx: TrialContext, trial: optuna.Trial) -> Callable[[EpochMetrics], None]:
    """Called after each epoch's validation: the one storage write per epoch (the intermediate
    value), then the reasons to stop: shutdown, cancellation, pruning. Storage calls ride out a
    database outage of up to ``storage_retry_s``; a trial that another worker failed meanwhile
    (our heartbeat went stale) raises UpdateFinishedTrialError here."""
    objective = ctx.rt.spec.objective
    n = trial.number

    def hook(m: EpochMetrics) -> None:
        with uninterruptible():
            if ctx.reports is not None:
                ctx.reports.raise_error(trial)  # writing its reports found it lost, or no db
            value = _objective_value(m, objective)
            # Already reported when report_epochs took the whole population's epoch at once.
            reported = m.epoch in trial._cached_frozen_trial.intermediate_values
            if math.isfinite(value) and not reported:
                if ctx.reports is None:
                    ctx.retry(lambda: trial.report(value, m.epoch), f"reporting trial {n}")
                else:  # a lone trial's: they wait with the population's (worker.epoch_reports)
                    ctx.reports.report([(trial, m.epoch, value)], ctx.retry)
                    ctx.reports.raise_error(trial)
            if ctx.on_epoch is not None:
                ctx.on_epoch(trial.number, m)
            stop = reason_to_stop(ctx)
            if stop is not None:
                raise stop
            if ctx.retry(
                lambda: ctx.pruning.should_prune(trial, m.epoch), f"pruning check of trial {n}"
            ):
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    return hook


def reason_to_stop(ctx: TrialContext, *, fresh: bool = False) -> Exception | None:
    """Why training should stop now: the worker is shutting down, or the job no longer runs
    (``fresh``: ask the database now rather than within ``JobStateProbe``'s interval)."""
    if ctx.should_stop():
        return WorkerStopping("worker is shutting down")
    if not ctx.retry(lambda: ctx.probe.running(fresh=fresh), f"checking job {ctx.rt.job_id}"):
        return JobCancelled("job is no longer running")
    return None


def report_epochs(ctx: TrialContext, epochs: list[tuple[optuna.Trial, EpochMetrics]]) -> None:
    """Report one epoch's intermediate values of a population's members.

    With ``ctx.reports`` they wait there and are written at most once per interval, or with
    each member's tell (see worker.epoch_reports). Without it they are written now in one
    commit, best effort: on any error (a member finished elsewhere, the database away) nothing
    is written and each member's ``epoch_hook`` reports on its own, with its own retries and
    error handling, as a lone trial does.
    """
    objective = ctx.rt.spec.objective
    values = [
        (trial, m.epoch, value)
        for trial, m in epochs
        if math.isfinite(value := _objective_value(m, objective))
        and m.epoch not in trial._cached_frozen_trial.intermediate_values
    ]
    if ctx.reports is not None:
        with uninterruptible():
            ctx.reports.report(values, ctx.retry)
        return
    if len(values) < 2:
        return  # nothing to share a commit with
    try:
        with uninterruptible():
            set_intermediate_values(ctx.rt.study, values)
    except Exception as e:
        log.debug(
            "job %s: batched epoch report failed (%s); reporting one by one", ctx.rt.job_id, e
        )


def _objective_value(m: EpochMetrics, objective: str) -> float:
    return m.val_accuracy if objective == "val_accuracy" else m.val_loss


def run_trial(ctx: TrialContext) -> TrialOutcome:
    """Run one trial for a job whose budget slot the caller has already reserved.

    Its epoch values wait and are written at most every ``ctx.report_interval_s`` and with its
    result, as a population's members' are (worker.epoch_reports), instead of in a commit per
    epoch: the bench's P=1 engine run spent 8.2% of its wall in storage with this, 10.2% in an
    earlier run without it (separate runs on one machine, not a controlled comparison).
    """
    if ctx.reports is None:
        ctx = replace(ctx, reports=EpochReports(ctx.rt.study, ctx.report_interval_s))
    claimed: list[int] = []
    try:
        trial = ask(ctx.rt, claimed)
    except BaseException:
        if not claimed:  # a claimed trial's slot is the reaper's to free (see ask_population)
            release_unasked(ctx)
        raise
    with Heartbeat(ctx.rt.study._storage, [trial._trial_id]):
        try:
            config = prepare(ctx, trial)
            with interruptible():
                result = train_trial(
                    config,
                    ctx.rt.data,
                    device=ctx.rt.device,
                    on_epoch=epoch_hook(ctx, trial),
                    keep_interrupt=True,
                )
        except Exception as e:
            return finish_interrupted(ctx, trial, e)
        if result.interrupted is not None:
            return finish_interrupted(ctx, trial, result.interrupted, result)
        return finish(ctx, trial, result)


def finish_interrupted(
    ctx: TrialContext,
    trial: optuna.Trial,
    exc: BaseException,
    result: TrialResult | None = None,
    *,
    counts_as_failure: bool = True,
) -> TrialOutcome:
    """Map the exception that ended a trial to its state (the one place this mapping lives).

    ``result``: what the trial trained before it was stopped; a pruned trial records it (its
    history, epochs and training time) like a finished one, so its cost shows too.
    ``counts_as_failure``: whether a failure of the trial's own (not a stop, cancel, outage or
    pruning) counts against the job's ``max_trial_failures``: a stack that fails as a whole
    is one failure, not one per member.
    """
    return _settled(
        ctx, trial, lambda: _finish_interrupted(ctx, trial, exc, result, counts_as_failure)
    )


def _settled(
    ctx: TrialContext, trial: optuna.Trial, record: Callable[[], TrialOutcome]
) -> TrialOutcome:
    """Run a trial's final storage writes: a trial already finished elsewhere (stale heartbeat)
    is LOST, and one whose database stays away is abandoned to the reaper."""
    try:
        return record()
    except UpdateFinishedTrialError:
        return _lost(ctx, trial)
    except Exception as e:
        if is_transient(e):
            return _abandon(ctx, trial, e)
        raise


def _finish_interrupted(
    ctx: TrialContext,
    trial: optuna.Trial,
    exc: BaseException,
    result: TrialResult | None,
    counts_as_failure: bool = True,
) -> TrialOutcome:
    rt, number = ctx.rt, trial.number
    if ctx.reports is not None and not isinstance(exc, optuna.TrialPruned):
        ctx.reports.write_trial(trial, exc)  # a pruned trial's go with its tell, below
    if isinstance(exc, UpdateFinishedTrialError):
        return _lost(ctx, trial)
    if is_transient(exc):
        # The database stayed away past storage_retry_s mid-trial; if it is back now, hand the
        # same parameters to the next worker (this attempt's epochs are lost, nothing else).
        reason = f"database unavailable: {describe(exc)}"
        log.warning("trial %s of job %s: %s; re-queued", number, rt.job_id, reason)
        return _fail(ctx, trial, Outcome.REQUEUED, reason=f"requeued: {reason}", requeue=True)
    if isinstance(exc, optuna.TrialPruned):
        return _tell_settled(ctx, [(trial, _pruned(rt, exc, result))])[number]
    if isinstance(exc, JobCancelled):
        return _fail(ctx, trial, Outcome.CANCELLED, reason=f"cancelled: {exc}")
    if isinstance(exc, WorkerStopping):
        log.info("trial %s of job %s stopped (%s); re-queueing it", number, rt.job_id, exc)
        return _fail(ctx, trial, Outcome.REQUEUED, reason=f"requeued: {exc}", requeue=True)
    # The trial's own failure: recorded on the trial and counted against the job. A grid point
    # is re-queued (the grid is complete only with every point); a random or TPE job samples
    # new parameters instead. Either way max_trial_failures bounds the attempts.
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("trial %s of job %s failed: %s", number, rt.job_id, reason)
    return _fail(
        ctx,
        trial,
        Outcome.FAILED,
        reason=reason,
        counts_as_failure=counts_as_failure,
        requeue=rt.spec.sampler.type == "grid",
    )


def _lost(ctx: TrialContext, trial: optuna.Trial) -> TrialOutcome:
    # Our heartbeat went stale (e.g. SIGSTOP) and the trial was failed and retried elsewhere:
    # the late report is dropped so the trial is not counted twice.
    log.warning(
        "trial %s of job %s was finished elsewhere (stale heartbeat); late result dropped",
        trial.number,
        ctx.rt.job_id,
    )
    return TrialOutcome(Outcome.LOST, trial.number, reason="finished elsewhere (stale heartbeat)")


def _abandon(ctx: TrialContext, trial: optuna.Trial, exc: BaseException) -> TrialOutcome:
    reason = f"database unavailable for more than {ctx.storage_retry_s:g}s: {describe(exc)}"
    log.error(
        "trial %s of job %s abandoned (%s); the stale-trial reaper will fail and re-queue it",
        trial.number,
        ctx.rt.job_id,
        reason,
    )
    return TrialOutcome(Outcome.ABANDONED, trial.number, reason=reason)


@dataclass(frozen=True)
class Settlement:
    """What finishing a trained trial records: its final state and value, its attributes."""

    state: TrialState  # COMPLETE or PRUNED (diverged, or no epoch finished)
    outcome: Outcome
    value: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def finish(ctx: TrialContext, trial: optuna.Trial, result: TrialResult) -> TrialOutcome:
    """Record a trained trial's result and tell it."""
    return finish_trials(ctx, [(trial, result)])[trial.number]


def finish_trials(
    ctx: TrialContext,
    trained: Sequence[tuple[optuna.Trial, TrialResult]],
    attrs: dict[str, Any] | None = None,
) -> dict[int, TrialOutcome]:
    """Finish trained trials (one, or a population's members), by trial number: each is
    settled (evaluated, and its weights saved if it is the job's new best), then all are
    recorded and told in one transaction (``tell_trials``), each with ``attrs`` besides its
    own results. A member that training stopped for another reason than pruning takes
    ``finish_interrupted``'s way.

    Give them best first: only the first one settled COMPLETE is checked for a new best (the
    others are no better than it, whether it was the best or not), so a population evaluates
    and saves at most one model and queries the best value once. Should that first one turn
    out lost (failed by the reaper before the tell) the job keeps its previous best model.
    """
    outcomes: dict[int, TrialOutcome] = {}
    settled: list[tuple[optuna.Trial, Settlement]] = []
    may_be_best = True
    for trial, result in trained:
        exc = result.interrupted
        if exc is not None and not isinstance(exc, optuna.TrialPruned):
            outcomes[trial.number] = finish_interrupted(ctx, trial, exc, result)
            continue
        try:
            if exc is not None:
                settlement = _pruned(ctx.rt, exc, result)
            else:
                settlement = _settle(ctx, trial, result, may_be_best)
        except UpdateFinishedTrialError:  # saving the best model found it failed elsewhere
            outcomes[trial.number] = _lost(ctx, trial)
            continue
        except Exception as e:
            if is_transient(e):
                outcomes[trial.number] = _abandon(ctx, trial, e)
            else:
                # Settling this one failed (evaluating it, saving its model: out of memory, a
                # full disk): it fails on its own, and its stack-mates are told as usual.
                outcomes[trial.number] = finish_interrupted(ctx, trial, e, result)
            continue
        may_be_best = may_be_best and settlement.state != TrialState.COMPLETE
        settlement.attrs.update(attrs or {})
        settled.append((trial, settlement))
    outcomes.update(_tell_settled(ctx, settled))
    return outcomes


def _pruned(rt: JobRuntime, exc: BaseException, result: TrialResult | None) -> Settlement:
    """A pruned trial records what it trained (history, epochs, time) like a finished one."""
    attrs = {} if result is None else _result_attrs(result, target=rt.spec.training.target_accuracy)
    return Settlement(TrialState.PRUNED, Outcome.PRUNED, attrs=attrs, reason=str(exc))


def _settle(
    ctx: TrialContext, trial: optuna.Trial, result: TrialResult, may_be_best: bool
) -> Settlement:
    rt, n = ctx.rt, trial.number
    attrs = _result_attrs(result, target=rt.spec.training.target_accuracy)
    if not result.diverged and result.best_val_accuracy is not None:
        # The lectures' overfitting measure: train minus validation accuracy of the kept model,
        # both in evaluation mode (the running train accuracy has dropout on and lags the epoch).
        _, train_acc = evaluate(result.model, rt.data.X_train, rt.data.y_train)
        attrs["train_accuracy"] = train_acc
        attrs["train_val_gap"] = train_acc - result.best_val_accuracy
    if result.diverged:
        # Diverged: stopped at once, recorded as PRUNED with the reason; only COMPLETE trials are
        # ranked, so it can never be the best trial, and it uses its budget slot like any result.
        return Settlement(
            TrialState.PRUNED, Outcome.DIVERGED, attrs=attrs, reason=result.diverged_reason
        )
    value = result.best_value
    if value is None:  # no epoch finished (cannot happen with max_epochs >= 1); never ranked
        return Settlement(
            TrialState.PRUNED, Outcome.PRUNED, attrs=attrs, reason="no epoch finished"
        )
    if may_be_best and ctx.retry(lambda: _is_new_best(rt.study, value), f"best of job {rt.job_id}"):
        attrs.update(
            ctx.retry(
                lambda: _save_best(rt, trial, result, ctx.artifact_store), f"saving trial {n}"
            )
        )
    return Settlement(TrialState.COMPLETE, Outcome.COMPLETE, value=value, attrs=attrs)


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
        attrs["best_train_accuracy"] = best["train_accuracy"]  # running, with dropout on
    if target is not None:
        attrs["epochs_to_target"] = next(
            (h["epoch"] for h in result.history if h["val_accuracy"] >= target), None
        )
    if result.diverged:
        attrs["diverged"] = True
        attrs["diverged_reason"] = result.diverged_reason
    return attrs


def _is_new_best(study: optuna.Study, value: float) -> bool:
    best = best_complete_value(study._storage, study._study_id, study.direction)
    if best is None:  # no complete trial yet
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


def _tell_settled(
    ctx: TrialContext, settled: Sequence[tuple[optuna.Trial, Settlement]]
) -> dict[int, TrialOutcome]:
    """Record and tell settled trials in one transaction; one that the stale-trial reaper
    failed first is LOST (its late result dropped), and if the database stays away past
    ``storage_retry_s`` all are abandoned to the reaper. ``tell_trials`` is safe to repeat
    after a lost answer, so retrying it never tells a trial twice."""
    if not settled:
        return {}
    rt = ctx.rt
    reports = ctx.reports
    tells = [
        Tell(t._trial_id, s.state, s.value, s.attrs, {} if reports is None else reports.take(t))
        for t, s in settled
    ]
    numbers = ", ".join(str(t.number) for t, _ in settled)
    try:
        told = ctx.retry(lambda: tell_trials(rt.study, tells), f"telling trials {numbers}")
    except Exception as e:
        if not is_transient(e):
            raise
        return {t.number: _abandon(ctx, t, e) for t, _ in settled}
    outcomes = {
        t.number: TrialOutcome(s.outcome, t.number, value=s.value, reason=s.reason)
        if ok
        else _lost(ctx, t)
        for (t, s), ok in zip(settled, told, strict=True)
    }
    if any(told) and not ctx.defer_job_count:
        count_finished_into_job(ctx)
    return outcomes


def count_finished_into_job(ctx: TrialContext) -> None:
    """Set the job's finished count from its study; the job succeeds when it reaches its budget."""
    rt = ctx.rt
    ctx.retry(lambda: sync_finished(rt.study, ctx.jobs, rt.job_id), "counting trials")


def sync_finished(study: optuna.Study, jobs: JobStore, job_id: str) -> Job:
    """Set the job's finished count from the study (COMPLETE + PRUNED); see JobStore.sync_finished."""
    return jobs.sync_finished(job_id, count_finished_trials(study._storage, study._study_id))


def _fail(
    ctx: TrialContext,
    trial: optuna.Trial,
    outcome: Outcome,
    *,
    reason: str,
    counts_as_failure: bool = False,
    requeue: bool = False,
) -> TrialOutcome:
    """Fail the trial (and re-queue its parameters), then give its budget slot back.

    Each step is retried while the database is away; failing is idempotent (fail_trial), and
    re-queueing happens only if we failed the trial: when the stale-trial reaper failed it first,
    its retry callback has already re-queued it and released the slot."""
    rt, n, trial_id = ctx.rt, trial.number, trial._trial_id
    ours = ctx.retry(
        lambda: fail_trial(
            rt.study, trial_id, reason, requeue=requeue, counts_as_failure=counts_as_failure
        ),
        f"failing trial {n}",
    )
    if not ours:
        return _lost(ctx, trial)
    # If this process dies before the next two steps end, the failure recorded what they owe
    # and the reaper pays it (Worker._settle_failures); both are idempotent.
    if requeue:
        _after_failing(
            ctx, lambda: requeue_trial(rt.study, trial_id, reason=reason), f"re-queueing trial {n}"
        )
    _after_failing(
        ctx,
        lambda: ctx.jobs.release_slot(rt.job_id, failed=counts_as_failure, trial_id=trial_id),
        f"releasing the slot of trial {n}",
    )
    return TrialOutcome(outcome, n, reason=reason)


def _after_failing(ctx: TrialContext, fn: Callable[[], Any], what: str) -> None:
    """A step that must follow a committed ``fail_trial``, retried for as long as the database
    stays away. The reaper takes it over only after heartbeat_grace_s and at its next settling
    pass (Worker._settle_failures: the step is idempotent, so both may try), so this worker
    keeps at it rather than leave the trial's grid point or budget slot waiting. Between rounds
    it backs off: once an outage has used up its allowance (TrialContext.retry), a round is a
    single try."""
    backoff = Backoff()
    while True:
        try:
            ctx.retry(fn, what)
            return
        except Exception as e:
            if not is_transient(e):
                raise
            log.error("%s: database unavailable (%s); still retrying", what, describe(e))
            time.sleep(backoff.next())


def requeue_trial(study: optuna.Study, trial_id: int, *, reason: str) -> None:
    """Put the trial's parameters back as WAITING so the next worker runs them (same seed).
    Once, whoever calls and however often: the copy's transaction marks the failed trial
    (add_requeued_copy), so the worker retrying through an outage and a reaper settling its
    failure meanwhile (Worker._settle_failures) do not both make one."""
    frozen = study._storage.get_trial(trial_id)
    if REQUEUED_ATTR in frozen.system_attrs:
        return
    system_attrs = {
        k: v
        for k, v in frozen.system_attrs.items()
        if k not in (WORKER_ATTR, "requeue_reason", *ATTEMPT_ATTRS)
    }
    system_attrs.setdefault(REQUEUED_FROM_ATTR, frozen.number)
    system_attrs[REQUEUE_OF_ATTR] = frozen.number
    system_attrs["requeue_reason"] = reason
    waiting = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=frozen.params,
        distributions=frozen.distributions,
        system_attrs=system_attrs,
    )
    add_requeued_copy(study, trial_id, waiting)
