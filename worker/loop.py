"""The worker loop: find runnable jobs, reserve a budget slot, run one trial, repeat.

Workers own no jobs; they take trials. Any number of them, on any machine that reaches the
database, cooperate through the jobs table (budget) and Optuna's storage (trials, heartbeats).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Protocol

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from service.config import Settings
from service.db import Job, JobStore, create_schema, make_engine
from service.errors import HPOError
from service.states import JobState
from service.studies import JOB_ID_ATTR, make_storage
from service.submission import estimate_parameters
from worker.population_runner import run_population
from worker.runtime import JobRuntime, RuntimeCache
from worker.training import EpochMetrics
from worker.trial_runner import JobStateProbe, Outcome, TrialContext, TrialOutcome, run_trial

log = logging.getLogger(__name__)


class WorkerListener(Protocol):
    def epoch_done(self, job: Job, number: int, metrics: EpochMetrics) -> None: ...
    def trial_done(self, job: Job, outcome: TrialOutcome) -> None: ...


@dataclass
class Worker:
    settings: Settings
    job_id: str | None = None  # restrict to one job (hpo run); runs until that job is terminal
    once: bool = False  # exit when nothing is runnable instead of polling
    max_trials: int | None = None
    allow_local_paths: bool = False
    listener: WorkerListener | None = None
    trials_run: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

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
        self._last_reap = 0.0

    def _artifact_dir(self) -> str:
        d = self.settings.resolved_artifact_dir
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    # Signals ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking trials; the current trial is re-queued at its next epoch boundary."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current epoch", signum)
            self.stop()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    # Main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self.reap(force=True)  # a restarted worker reclaims its predecessors' dead trials first
        while not self._stop.is_set():
            if self.max_trials is not None and self.trials_run >= self.max_trials:
                break
            self.reap()
            if self.job_id is not None and JobState(self.jobs.get(self.job_id).state) in {
                JobState.SUCCEEDED,
                JobState.FAILED,
                JobState.CANCELLED,
            }:
                break
            if self._run_one():
                continue
            if self.once and self.job_id is None:
                break
            self._stop.wait(self.settings.poll_interval_s)
        return self.trials_run

    def _candidates(self) -> list[Job]:
        if self.job_id is not None:
            job = self.jobs.get(self.job_id)
            return [job] if job.reserved < job.n_trials else []
        return self.jobs.runnable()

    def _run_one(self) -> bool:
        for job in self._candidates():
            if job.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            if not self.jobs.reserve_slot(job.id):
                continue
            if job.state == JobState.QUEUED:
                self.jobs.try_transition(job.id, JobState.RUNNING)
            try:
                rt = self.cache.get(job)
            except (HPOError, ValidationError, ValueError, OSError) as e:
                # The dataset or spec cannot be loaded (bad data, or a spec from a newer API
                # version): no trial of this job can ever run here, so the job fails with why.
                self.jobs.release_slot(job.id)
                self.jobs.try_transition(job.id, JobState.FAILED, error=f"cannot start: {e}")
                log.error("job %s failed to start: %s", job.id, e)
                return True
            on_epoch = partial(self.listener.epoch_done, job) if self.listener else None
            ctx = TrialContext(
                rt,
                self.jobs,
                self.artifacts,
                JobStateProbe(self.jobs, job.id),
                self._stop.is_set,
                on_epoch,
            )
            n = 1 + self._reserve_more(job, self._population_size(rt) - 1)
            outcomes = [run_trial(ctx)] if n == 1 else run_population(ctx, n)
            for outcome in outcomes:
                self.trials_run += 1
                self._after_trial(job, outcome)
            return True
        return False

    def _population_size(self, rt: JobRuntime) -> int:
        """P: the configured --population, else chosen from the device and the model size."""
        if self.settings.population is not None:
            return max(1, self.settings.population)
        from worker.population import auto_population_size

        n_params = estimate_parameters(rt.spec, rt.n_features, rt.n_classes)
        return auto_population_size(n_params, int(rt.data.X_train.shape[0]), rt.device)

    def _reserve_more(self, job: Job, k: int) -> int:
        if self.max_trials is not None:
            k = min(k, self.max_trials - self.trials_run - 1)
        got = 0
        while got < k and self.jobs.reserve_slot(job.id):
            got += 1
        return got

    def _after_trial(self, job: Job, outcome: TrialOutcome) -> None:
        if outcome.outcome is Outcome.FAILED:
            fresh = self.jobs.get(job.id)
            if fresh.failures >= self.settings.max_trial_failures:
                self.jobs.try_transition(
                    job.id,
                    JobState.FAILED,
                    error=f"{fresh.failures} trials failed; last error: {outcome.reason}",
                )
        if outcome.outcome is Outcome.CANCELLED:
            self._finish_cancel(job.id)
        if self.listener:
            self.listener.trial_done(job, outcome)

    # Housekeeping -----------------------------------------------------------------------------
    def reap(self, *, force: bool = False) -> None:
        """Fail stale trials (and re-queue them), settle cancelling and finished jobs."""
        now = time.monotonic()
        if not force and now - self._last_reap < self.settings.heartbeat_interval_s:
            return
        self._last_reap = now
        active = [*self.jobs.in_state(JobState.RUNNING), *self.jobs.in_state(JobState.CANCELLING)]
        for job in active:
            if self.job_id is not None and job.id != self.job_id:
                continue
            try:
                study = optuna.load_study(study_name=job.study_name, storage=self.storage)
            except KeyError:
                continue
            fail_stale_trials(study)
            if job.state == JobState.CANCELLING:
                self._finish_cancel(job.id, study)
            elif job.finished >= job.n_trials:
                self.jobs.try_transition(job.id, JobState.SUCCEEDED)

    def _finish_cancel(self, job_id: str, study: optuna.Study | None = None) -> None:
        job = self.jobs.get(job_id)
        if job.state != JobState.CANCELLING:
            return
        study = study or optuna.load_study(study_name=job.study_name, storage=self.storage)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.jobs.try_transition(job_id, JobState.CANCELLED)

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # A dead worker's trial was failed and re-queued: give its budget slot to the retry.
        job_id = study.user_attrs.get(JOB_ID_ATTR)
        if job_id:
            self.jobs.release_slot(job_id)
            log.warning(
                "trial %s of job %s went stale; re-queued with the same parameters",
                trial.number,
                job_id,
            )
