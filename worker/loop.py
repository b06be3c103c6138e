"""The worker loop: find runnable jobs, reserve a budget slot, run one trial, repeat.

Workers own no jobs; they take trials. Any number of them, on any machine that reaches the
database, cooperate through the jobs table (budget) and Optuna's storage (trials, heartbeats).

Faults the loop survives: a dead worker's trials are failed and re-queued by any other worker's
reaper thread within heartbeat interval + grace (and by a new worker at start-up); the database
going away makes the loop back off and retry instead of exiting; SIGTERM stops the current trial
at its next epoch boundary, or mid-epoch once the stop grace period is nearly over.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any, Protocol

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from service import defaults
from service.config import Settings
from service.db import Job, JobStore, create_schema, make_engine
from service.db.retry import Backoff, describe, is_transient
from service.db.watch import CommitWatch
from service.errors import HPOError, NotFoundError
from service.states import JobState
from service.studies import (
    JOB_ID_ATTR,
    SPEC_ATTR,
    count_finished_trials,
    count_trials_by_state,
    make_storage,
    stale_study_names,
)
from service.submission import estimate_parameters
from service.trial_attrs import ATTEMPT_ATTRS, unsettled_failures
from worker.population_runner import run_population
from worker.runtime import JobRuntime, RuntimeCache, warm_up
from worker.stop_flag import StopFlag
from worker.training import EpochMetrics
from worker.training.numerics import denormals_flushed, flush_denormals
from worker.trial_runner import (
    REQUEUE_OF_ATTR,
    TRAINING_GATE,
    JobStateProbe,
    Outcome,
    TrialContext,
    TrialOutcome,
    WorkerStopping,
    release_slots,
    requeue_trial,
    run_trial,
)

log = logging.getLogger(__name__)

# The reaper also re-counts finished trials and settles finished or cancelled jobs, which only
# matters after a crash between a tell and its bookkeeping: every this many heartbeat intervals.
SETTLE_EVERY = 10
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class WorkerListener(Protocol):
    def epoch_done(self, job: Job, number: int, metrics: EpochMetrics) -> None: ...

    # Once per batch of trials run together (one for a sequential trial, a whole population
    # otherwise), after each one's bookkeeping: a listener that reads the study refreshes once.
    def trials_done(self, job: Job, outcomes: list[TrialOutcome]) -> None: ...


@dataclass
class Worker:
    settings: Settings
    job_id: str | None = None  # restrict to one job (hpo run); runs until that job is terminal
    once: bool = False  # exit when nothing is runnable instead of polling
    max_trials: int | None = None
    allow_local_paths: bool = False
    listener: WorkerListener | None = None
    on_ready: Callable[[], None] | None = None  # called once, when the loop starts taking trials
    trials_run: int = 0
    denormals: str = "unset"  # how run() left denormal floats: "flushed", "kept", "... partly"
    # Set by the SIGTERM/SIGINT handler: a StopFlag, as threading.Event.set can deadlock there.
    _stop: StopFlag = field(default_factory=StopFlag)

    def __post_init__(self) -> None:
        url = self.settings.resolved_database_url
        self.engine = make_engine(url)
        create_schema(self.engine)
        self.jobs = JobStore(self.engine)
        self.storage = make_storage(url, self.settings, heartbeat=True, on_stale=self._on_stale)
        self.artifacts = FileSystemArtifactStore(str(self._artifact_dir()))
        self.cache = RuntimeCache(
            self.settings, self.storage, allow_local_paths=self.allow_local_paths
        )
        if self.settings.torch_threads is not None:
            # Several workers on one machine must not oversubscribe its cores.
            torch.set_num_threads(max(1, self.settings.torch_threads))
        self._last_reap = 0.0
        self._reaps = 0
        self._reap_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()
        self._deadline_armed = False

    def _artifact_dir(self) -> str:
        d = self.settings.resolved_artifact_dir
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    # Signals ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking trials; the current trial is re-queued at its next epoch boundary."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT: stop after the current epoch. An epoch that would outlast the stop
        grace period (docker's SIGKILL follows it) is interrupted by SIGALRM at
        ``stop_grace_s - STOP_MARGIN_S``, leaving the margin to fail and re-queue the trial."""

        def _handler(signum: int, _frame: FrameType | None) -> None:
            if self._stop.is_set():
                return
            log.info("signal %s: stopping after the current epoch", signum)
            self.stop()
            deadline = max(0.5, self.settings.stop_grace_s - defaults.STOP_MARGIN_S)
            signal.setitimer(signal.ITIMER_REAL, deadline)
            self._deadline_armed = True

        def _deadline(_signum: int, _frame: FrameType | None) -> None:
            if TRAINING_GATE.training:  # never inside a storage write or a trial's finishing
                raise WorkerStopping("stop grace period ending: trial interrupted mid-epoch")

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGALRM, _deadline)

    # Main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        """Run trials until stopped (or, with job_id / once / max_trials, until done). A database
        that goes away is waited for with backoff; the loop never exits because of it."""
        flush = self.settings.flush_denormals
        with flush_denormals(flush) as everywhere:  # for this thread and the pool it starts
            self.denormals = "flushed" if flush else "kept"
            if not everywhere and flush and not denormals_flushed():
                self.denormals = "kept (this CPU cannot flush them)"
            elif not everywhere:
                self.denormals += " partly"
                log.warning(
                    "denormal floats are %s on this thread only: torch's intra-op threads "
                    "started before the worker and keep their mode",
                    "flushed" if flush else "kept",
                )
            return self._run()

    def _run(self) -> int:
        backoff = Backoff(maximum=10.0)
        started = False
        watch: CommitWatch | None = None
        try:
            while not self._stop.is_set():
                try:
                    if not started:
                        # A restarted worker reclaims its predecessors' dead trials first, before
                        # it asks for any trial (a job whose budget the dead held is not runnable).
                        self.reap(force=True)
                        self._start_reaper()
                        started = True
                        warm_up()  # after reclaiming dead trials, before taking any
                        if self.on_ready is not None:
                            self.on_ready()
                    if self.max_trials is not None and self.trials_run >= self.max_trials:
                        break
                    if self.job_id is not None and self._own_job_done():
                        break
                    if watch is None and self.engine.dialect.name == "sqlite":
                        watch = CommitWatch(self.engine)  # a connection of this thread's own
                    if watch is not None:
                        watch.changed()  # what the query below sees; later commits wake us
                    ran = self._run_one()
                    backoff.reset()
                    if ran:
                        continue
                    if self.once and self.job_id is None:
                        break
                    self._idle_wait(watch)
                except NotFoundError as e:
                    if self.job_id is not None:
                        log.warning("job %s no longer exists; stopping", self.job_id)
                        break
                    log.warning("a job vanished while this worker used it: %s", e)
                except Exception as e:
                    if watch is not None:  # the database may have gone or been replaced
                        watch.close()
                        watch = None
                    if not is_transient(e) and (self.job_id is not None or self.once):
                        raise  # a one-shot run reports its bug instead of retrying forever
                    delay = backoff.next()
                    if is_transient(e):
                        log.warning(
                            "database unavailable (%s); retrying in %.1fs", describe(e), delay
                        )
                    else:
                        log.exception(
                            "unexpected error in the worker loop; retrying in %.1fs", delay
                        )
                    self._stop.wait(delay)
        finally:
            if watch is not None:
                watch.close()
            log.info("worker loop ended after %d trials", self.trials_run)
            self._stop_reaper()
            if self._deadline_armed:  # a late SIGALRM at interpreter exit would kill us (rc -14)
                signal.setitimer(signal.ITIMER_REAL, 0)
        return self.trials_run

    def _idle_wait(self, watch: CommitWatch | None) -> None:
        """Until the poll interval passes, the worker is stopped, or (SQLite) someone commits.

        A submitted job used to wait for the next poll (0.125 s on average, 0.25 s at most);
        with the watch an idle worker looks within ``WATCH_TICK_S``, and its query for runnable
        jobs still runs only after a commit or once per poll interval.
        """
        if watch is None:
            self._stop.wait(self.settings.poll_interval_s)
            return
        deadline = time.monotonic() + self.settings.poll_interval_s
        while not self._stop.wait(min(WATCH_TICK_S, max(0.0, deadline - time.monotonic()))):
            if watch.changed() or time.monotonic() >= deadline:
                return

    def _own_job_done(self) -> bool:
        assert self.job_id is not None
        return JobState(self.jobs.get(self.job_id).state) in TERMINAL

    def _candidates(self) -> list[Job]:
        if self.job_id is not None:
            job = self.jobs.get(self.job_id)
            return [job] if job.reserved < job.n_trials else []
        return self.jobs.runnable()

    def _run_one(self) -> bool:
        for job in self._candidates():
            if job.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            # Load (once per process) before reserving: a slot is then held only for the
            # milliseconds between reserving and asking, never across a slow dataset load.
            rt = self._runtime(job)
            if rt is None:
                return True
            if not self.jobs.reserve_slot(job.id):
                continue
            n = 1
            try:
                if job.state == JobState.QUEUED:
                    self.jobs.try_transition(job.id, JobState.RUNNING)
                on_epoch = partial(self.listener.epoch_done, job) if self.listener else None
                ctx = TrialContext(
                    rt,
                    self.jobs,
                    self.artifacts,
                    JobStateProbe(self.jobs, job.id),
                    self._stop.is_set,
                    on_epoch,
                    storage_retry_s=self.settings.storage_retry_s,
                    report_interval_s=self.settings.epoch_report_interval_s,
                )
                n += self._reserve_more(job, self._population_size(job, rt) - 1)
            except BaseException:
                release_slots(self.jobs, job.id, n, self.settings.storage_retry_s)
                raise
            # fp32 single trials take the sequential path; bf16/tf32 live in the population trainer.
            sequential = n == 1 and rt.spec.training.precision == "fp32"
            outcomes = [run_trial(ctx)] if sequential else run_population(ctx, n)
            for outcome in outcomes:
                self.trials_run += 1
                self._after_trial(job, outcome)
            if self.listener and outcomes:
                self.listener.trials_done(job, outcomes)
            return True
        return False

    def _runtime(self, job: Job) -> JobRuntime | None:
        """The job's runtime, or None after failing a job whose spec or data cannot load."""
        try:
            return self.cache.get(job)
        except (HPOError, ValidationError, ValueError, OSError, KeyError) as e:
            if is_transient(e):
                raise
            # The dataset or spec cannot be loaded (bad data, a spec from a newer API version,
            # a study deleted under the job): no trial of this job can ever run here.
            reason = f"cannot start: {e}" if not isinstance(e, KeyError) else "its study is gone"
            self.jobs.try_transition(job.id, JobState.FAILED, error=reason)
            log.error("job %s failed to start: %s", job.id, reason)
            return None

    def _population_size(self, job: Job, rt: JobRuntime) -> int:
        """P: the configured --population, else chosen from the device and the model size
        (and, on CPU, small enough for a comparing pruner to see waves: pruner_wave_cap);
        capped while the pruner still waits for its start-up trials (see pruner_startup_cap)
        and to this process's share of the job's unfinished trials (see sibling_share_cap)."""
        siblings = self.settings.worker_siblings
        if self.settings.population is not None:
            p = max(1, self.settings.population)
        else:
            from worker.population import auto_population_size

            n_params = estimate_parameters(rt.spec, rt.n_features, rt.n_classes)
            p = auto_population_size(n_params, int(rt.data.X_train.shape[0]), rt.device)
            p = min(p, pruner_wave_cap(job, rt, siblings))
        return min(p, pruner_startup_cap(rt, siblings), sibling_share_cap(job, siblings))

    def _reserve_more(self, job: Job, k: int) -> int:
        if self.max_trials is not None:
            k = min(k, self.max_trials - self.trials_run - 1)
        if k <= 0:
            return 0
        try:
            return self.jobs.reserve_slots(job.id, k)
        except Exception as e:
            if not is_transient(e):
                raise
            return 0  # the transaction took none: run the one slot already held

    def _after_trial(self, job: Job, outcome: TrialOutcome) -> None:
        if outcome.outcome is Outcome.FAILED:
            self._fail_job_at_max_failures(job.id, outcome.reason or "")
        if outcome.outcome is Outcome.CANCELLED:
            self._finish_cancel(job.id)

    # Housekeeping -----------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        """Reap every heartbeat interval in a thread, so a stale trial is failed and re-queued
        within interval + grace even while this worker is busy training a long trial."""
        self._reaper = threading.Thread(target=self._reap_forever, name="hpo-reaper", daemon=True)
        self._reaper.start()

    def _stop_reaper(self) -> None:
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=30)

    def _reap_forever(self) -> None:
        failing = False
        while not self._reaper_stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.reap(force=True)
                failing = False
            except Exception as e:
                if is_transient(e):
                    if not failing:
                        log.warning("reaper: database unavailable (%s)", describe(e))
                else:
                    log.exception("reaper failed")
                failing = True

    def reap(self, *, force: bool = False) -> None:
        """Fail stale trials (and re-queue them), settle cancelling and finished jobs."""
        now = time.monotonic()
        if not force and now - self._last_reap < self.settings.heartbeat_interval_s:
            return
        with self._reap_lock:
            self._last_reap = now
            settle = self._reaps % SETTLE_EVERY == 0
            self._reaps += 1
            stale = stale_study_names(self.storage, self.settings.heartbeat_grace_s)
            active = [
                *self.jobs.in_state(JobState.RUNNING),
                *self.jobs.in_state(JobState.CANCELLING),
            ]
            for job in active:
                if self.job_id is not None and job.id != self.job_id:
                    continue
                if job.study_name in stale or settle or job.state == JobState.CANCELLING:
                    try:
                        self._reap_job(job, stale=job.study_name in stale)
                    except (KeyError, NotFoundError):  # deleted meanwhile
                        continue

    def _reap_job(self, job: Job, *, stale: bool) -> None:
        study = optuna.load_study(study_name=job.study_name, storage=self.storage)
        if stale:
            fail_stale_trials(study)
        self._settle_failures(study, job)
        if job.state == JobState.CANCELLING:
            self._finish_cancel(job.id, study)
            return
        done = count_finished_trials(self.storage, study._study_id)
        if done > job.finished:  # a crash between a tell and its count; see sync_finished
            job = self.jobs.sync_finished(job.id, done)
        if job.finished >= job.n_trials:
            self.jobs.try_transition(job.id, JobState.SUCCEEDED)

    def _settle_failures(self, study: optuna.Study, job: Job) -> None:
        """Trials whose worker failed them and died before re-queueing them or giving their
        budget slot back (SIGKILL, power loss): do what that worker would have done (see
        service.trial_attrs.FAIL_SETTLE_ATTR). Without it the slot stayed taken and the job
        never ended. A failure is left to its own worker for heartbeat_grace_s; after that both
        may try (one still retrying through an outage, say): the copy and the release are each
        made once (add_requeued_copy, JobStore.release_slot)."""
        failed_before = time.time() - self.settings.heartbeat_grace_s
        for u in unsettled_failures(study, failed_before):
            try:
                if u.requeue:
                    requeue_trial(study, u.trial_id, reason=u.reason)
                released = self.jobs.release_slot(
                    job.id, failed=u.counts_as_failure, trial_id=u.trial_id
                )
            except Exception as e:
                if is_transient(e):
                    raise
                # One trial's bookkeeping must not stop the reaping of every job after it.
                log.error("settling failed trial %s of job %s: %s", u.number, job.id, e)
                continue
            if not released:
                continue  # its worker (or another reaper) got there first
            log.warning(
                "trial %s of job %s was failed (%s) by a worker that died before finishing "
                "with it; %s",
                u.number,
                job.id,
                u.reason,
                "re-queued it with the same parameters and released its budget slot"
                if u.requeue
                else "released its budget slot",
            )
            if u.counts_as_failure:
                self._fail_job_at_max_failures(job.id, u.reason)

    def _finish_cancel(self, job_id: str, study: optuna.Study | None = None) -> None:
        job = self.jobs.get(job_id)
        if job.state != JobState.CANCELLING:
            return
        study = study or optuna.load_study(study_name=job.study_name, storage=self.storage)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.jobs.try_transition(job_id, JobState.CANCELLED)

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A dead worker's trial was failed and (up to max_trial_retries) re-queued by Optuna's
        retry callback: give its budget slot to the retry. A trial that went stale more often
        than that is counted as a failure of the job (it may be what kills its workers, e.g. the
        kernel's OOM killer), so a crash loop ends after max_trial_failures; a grid point is
        re-queued even then, so the grid stays complete while the job lives."""
        attrs = study.user_attrs
        job_id = attrs.get(JOB_ID_ATTR)
        if not job_id:
            return
        history = trial.system_attrs.get("retry_history", [])
        max_retry = self.settings.max_trial_retries
        exhausted = len(history) + 1 > max_retry
        grid = (attrs.get(SPEC_ATTR) or {}).get("sampler", {}).get("type") == "grid"
        if exhausted and grid:
            _requeue_exhausted(study, trial)
        self.jobs.release_slot(job_id, failed=exhausted, trial_id=trial._trial_id)
        log.warning(
            "trial %s of job %s went stale (attempt %d); %s",
            trial.number,
            job_id,
            len(history) + 1,
            "re-queued with the same parameters"
            if not exhausted or grid
            else "not retried again; counted as a failure",
        )
        if exhausted:
            self._fail_job_at_max_failures(
                job_id,
                f"trial {trial.number} lost its worker {len(history) + 1} times "
                "(crash or out of memory)",
            )

    def _fail_job_at_max_failures(self, job_id: str, last_error: str) -> None:
        """After a failure counted against the job: fail the job once it has max_trial_failures."""
        job = self.jobs.get(job_id)
        if job.failures >= self.settings.max_trial_failures:
            self.jobs.try_transition(
                job_id,
                JobState.FAILED,
                error=f"{job.failures} trials failed; last error: {last_error}",
            )


def pruner_startup_cap(rt: JobRuntime, siblings: int = 1) -> int:
    """The largest population to take now, while the pruner waits for its start-up trials.

    The median and percentile pruners compare a trial only with COMPLETE ones. A first
    population holding every trial would leave them nothing to compare with, so no trial would
    ever be pruned; until ``n_startup_trials`` have completed, a population holds only start-up
    trials that nobody runs yet, and later populations are pruned as in the sequential path.

    ``siblings`` worker processes started together (``hpo worker --processes N``) share the
    start-up trials: the first takes its share, the next the rest of the missing ones, instead
    of each taking all of them (measured: two processes each holding the 5 start-up trials of
    the bench's job trained 10 unprunable trials, 100 epochs, where one process trains 50).
    A worker that finds every start-up trial already running elsewhere takes one trial: it can
    be pruned as soon as those complete, where a whole population beside them could not.
    """
    pruner = rt.spec.pruner
    if pruner.type not in ("median", "percentile"):
        return 1 << 30
    # counted in SQL: loading the trials took 8 ms per population at 48 trials
    states = count_trials_by_state(rt.study._storage, rt.study._study_id)
    missing = pruner.n_startup_trials - states.get(TrialState.COMPLETE, 0)
    if missing <= 0:
        return 1 << 30
    free = missing - states.get(TrialState.RUNNING, 0)
    return max(1, min(free, math.ceil(missing / siblings)))


# How often an idle worker on SQLite checks whether the database changed (CommitWatch): a
# PRAGMA on a held connection, microseconds each.
WATCH_TICK_S = 0.01

# A job pruned against its finished trials gets automatic populations (on CPU) of at most
# ceil(trials after the pruner's start-up ones / PRUNER_WAVES): about that many waves, fewer
# for a small budget (see pruner_wave_cap).
PRUNER_WAVES = 4


def pruner_wave_cap(job: Job, rt: JobRuntime, siblings: int = 1) -> int:
    """The largest automatic population on CPU for a job with a median or percentile pruner.

    Members of one population are pruned only against trials that finished before it started
    (they report together, and the pruners ignore running trials), so one population holding
    every trial after the start-up ones compares them all with those few, and a population
    rarely gets pruned. Splitting the rest of the budget into ``PRUNER_WAVES`` populations
    gives each wave the finished waves before it to be compared with. On CPU, with denormals
    flushed, training cost per model-epoch barely depends on P from 8 up (measured on the
    bench's 784-128-10 MLP: P=8 17, P=16 15, P=64 17 ms), so the epochs pruning saves are the
    bigger gain. Measured on the bench's 48-trial job (5 start-up trials, engine on 2 threads),
    with a fixed --population: P=64 trained 236 epochs in 5.35 s; P=12 182 epochs in 4.88 s
    with the same best trial; P=16 209 epochs, 5.39 s; P=8 177 epochs, 4.92 s. This cap gives
    11 there (stacks of 5, 11, 11, 11, 10): 180 epochs, 4.85 s. On CUDA, where a stack's
    step time hardly grows with P, P stays as large as memory allows (not measured here: no GPU).

    ``siblings`` worker processes started together (``hpo worker --processes N``) share each
    wave, so the job keeps about ``PRUNER_WAVES`` waves in flight rather than N times fewer,
    N times larger ones. Measured with the bench's service contender (2 single-threaded
    processes, AMD EPYC Zen 4), 8 interleaved pairs: waves of 11 per process took 5.69-6.32 s
    and trained 190-223 model-epochs, shared waves (6 per process) 5.30-5.97 s and 188-197.
    Workers started separately do not know of each other and take whole waves.
    """
    pruner = rt.spec.pruner
    if pruner.type not in ("median", "percentile") or rt.device.type != "cpu":
        return 1 << 30
    after_startup = job.n_trials - pruner.n_startup_trials
    if after_startup <= 0:  # every trial is a start-up trial: nothing is ever pruned
        return 1 << 30
    return math.ceil(after_startup / (PRUNER_WAVES * max(1, siblings)))


def sibling_share_cap(job: Job, siblings: int = 1) -> int:
    """At most 1/``siblings`` of the job's unfinished trials, so processes started together
    (``hpo worker --processes N``) end the job together.

    Without it the first process to ask after the pruner's start-up trials took the whole rest
    of the budget into one population (auto P is 64 on a CPU with a large cache) and its
    sibling sat idle: measured on the bench's 48-trial job, one process trained 42 trials for
    8.4 s while the other had finished at 2.1 s. Counting unfinished rather than unreserved
    trials lets the second process take as many as the first: 42 left gives 21 and 21. Only the
    tail of a budget is affected: with more trials left than siblings x P it never binds.
    """
    return math.ceil(max(1, job.n_trials - job.finished) / siblings)


def _requeue_exhausted(study: optuna.Study, trial: FrozenTrial) -> None:
    system_attrs: dict[str, Any] = {
        "failed_trial": trial.number,
        "retry_history": [],
        **{k: v for k, v in trial.system_attrs.items() if k not in ATTEMPT_ATTRS},
    }
    system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
    system_attrs[REQUEUE_OF_ATTR] = trial.number
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs=system_attrs,
        )
    )
