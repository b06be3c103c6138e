"""Jobs table operations. Every state change and budget update is one conditional UPDATE, so any
number of API and worker processes on any number of machines stay consistent without locks."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

from optuna.storages._rdb import models as optuna_models
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.engine import reader
from service.db.models import Job, utcnow
from service.errors import ConflictError, InvalidTransitionError, NotFoundError
from service.spec import JobSpec, spec_to_json
from service.states import (
    ACTIVE_STATES,
    RUNNABLE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
    check_transition,
)

# Written on a failed trial (Optuna's trial_system_attributes) in the same transaction as its
# slot's release, so the release happens once however often it is tried, by the worker or the
# reaper (service.trial_attrs.FAIL_SETTLE_ATTR); the unique (trial, key) makes a second one fail.
SLOT_RELEASED_ATTR = "hpo_slot_released"


def is_unique_violation(e: IntegrityError) -> bool:
    """A duplicate key (SQLite's UNIQUE constraint, PostgreSQL's SQLSTATE 23505), not another
    integrity error such as a missing foreign key."""
    orig = e.orig
    return getattr(orig, "sqlstate", None) == "23505" or "UNIQUE constraint failed" in str(orig)


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(spec_to_json(spec).encode()).hexdigest()


def new_job_id() -> str:
    return uuid.uuid4().hex


def study_name_for(name: str, job_id: str) -> str:
    return f"{name}.{job_id[:8]}"


@dataclass
class JobStore:
    """Small interface over the jobs table; one instance per process, thread-safe (sessions per call)."""

    engine: Engine

    # Creation ---------------------------------------------------------------------------------
    def create(
        self,
        spec: JobSpec,
        *,
        owner: str = "local",
        idempotency_key: str | None = None,
        job_id: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; returns (job, created). The same idempotency key and spec returns the
        existing job (created False); the same key with another spec raises ConflictError."""
        digest = spec_hash(spec)
        if idempotency_key is not None:
            existing = self.by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._same_key(existing, digest, idempotency_key), False
        jid = job_id or new_job_id()
        job = Job(
            id=jid,
            name=spec.name,
            owner=owner,
            study_name=study_name_for(spec.name, jid),
            spec_json=spec_to_json(spec),
            spec_hash=digest,
            state=JobState.QUEUED.value,
            n_trials=spec.budget(),
            reserved=0,
            finished=0,
            failures=0,
            idempotency_key=idempotency_key,
        )
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                s.add(job)
        except IntegrityError:
            # Two requests with the same key raced; the loser answers with the winner's job.
            if idempotency_key is None:
                raise
            existing = self.by_idempotency_key(owner, idempotency_key)
            if existing is None:
                raise
            return self._same_key(existing, digest, idempotency_key), False
        return job, True

    @staticmethod
    def _same_key(existing: Job, digest: str, key: str) -> Job:
        if existing.spec_hash != digest:
            raise ConflictError(
                f"Idempotency-Key {key!r} was already used with a different job spec (job {existing.id})",
                field="Idempotency-Key",
            )
        return existing

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        with Session(reader(self.engine), expire_on_commit=False) as s:
            return s.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))

    # Reads ------------------------------------------------------------------------------------
    def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job, or NotFoundError (also when it belongs to another owner)."""
        with Session(reader(self.engine), expire_on_commit=False) as s:
            job = s.get(Job, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFoundError(f"no job with id {job_id!r}", field="job_id")
        return job

    def find_by_name(self, name: str, *, owner: str | None = None) -> list[Job]:
        with Session(reader(self.engine), expire_on_commit=False) as s:
            q = select(Job).where(Job.name == name)
            if owner is not None:
                q = q.where(Job.owner == owner)
            return list(s.scalars(q.order_by(Job.created_at.desc())))

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        state: str | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is the (created_at, id) of the last item of the previous page."""
        with Session(reader(self.engine), expire_on_commit=False) as s:
            q = select(Job)
            if owner is not None:
                q = q.where(Job.owner == owner)
            if state is not None:
                q = q.where(Job.state == state)
            if before is not None:
                ts, jid = before
                q = q.where((Job.created_at < ts) | ((Job.created_at == ts) & (Job.id < jid)))
            return list(s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))

    def runnable(self, *, limit: int = 20) -> list[Job]:
        """Jobs a worker may take trials from, oldest first."""
        with Session(reader(self.engine), expire_on_commit=False) as s:
            q = (
                select(Job)
                .where(
                    Job.state.in_([st.value for st in RUNNABLE_STATES]), Job.reserved < Job.n_trials
                )
                .order_by(Job.created_at, Job.id)
                .limit(limit)
            )
            return list(s.scalars(q))

    def in_state(self, state: JobState) -> list[Job]:
        with Session(reader(self.engine), expire_on_commit=False) as s:
            return list(
                s.scalars(select(Job).where(Job.state == state.value).order_by(Job.created_at))
            )

    def count_active(self, owner: str) -> int:
        with Session(reader(self.engine)) as s:
            q = (
                select(func.count())
                .select_from(Job)
                .where(Job.owner == owner, Job.state.in_([st.value for st in ACTIVE_STATES]))
            )
            return int(s.scalar(q) or 0)

    def counts_by_state(self) -> dict[str, int]:
        with Session(reader(self.engine)) as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: int(n) for state, n in rows}

    # State machine ----------------------------------------------------------------------------
    def transition(self, job_id: str, target: JobState, *, error: str | None = None) -> bool:
        """Apply ``current -> target`` if allowed. Returns False when another process changed the
        state first (the conditional UPDATE matched nothing); raises InvalidTransitionError when
        the transition is not in the table."""
        job = self.get(job_id)
        check_transition(job.state, target)
        values: dict[str, object] = {"state": target.value, "updated_at": utcnow()}
        if target is JobState.RUNNING:
            values["started_at"] = utcnow()
        if target in TERMINAL_STATES:
            values["finished_at"] = utcnow()
        if error is not None:
            values["error"] = error
        with Session(self.engine) as s, s.begin():
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.state == job.state).values(**values)
            )
            return res.rowcount == 1  # type: ignore[attr-defined]

    def try_transition(self, job_id: str, target: JobState, *, error: str | None = None) -> bool:
        """Like transition, but a disallowed move returns False instead of raising (worker races)."""
        try:
            return self.transition(job_id, target, error=error)
        except InvalidTransitionError:  # someone else moved it already
            return False

    # Budget -----------------------------------------------------------------------------------
    def reserve_slot(self, job_id: str) -> bool:
        """Atomically take one trial slot of the budget; False when none is left or job not runnable."""
        return self.reserve_slots(job_id, 1) == 1

    def reserve_slots(self, job_id: str, k: int) -> int:
        """Take up to ``k`` trial slots in one transaction; how many (0 when none is left or the
        job is not runnable). A population's slots cost one commit, not one each (43 commits,
        32 ms, for the bench's 48-trial job), and three statements, not one per slot (507
        single-slot updates took 0.16 s on an H200 host's CPU). The first statement writes
        the job's row without changing it: that takes the row's write lock (SQLite: the
        database's) before anything is read, so the read and the update after it see no
        concurrent reservation, and there is no read-then-write upgrade for SQLite to refuse.
        """
        if k < 1:
            return 0
        runnable = [st.value for st in RUNNABLE_STATES]
        with Session(self.engine) as s, s.begin():
            locked = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(runnable))
                .values(reserved=Job.reserved)
            )
            if locked.rowcount != 1:  # type: ignore[attr-defined]
                return 0
            reserved, n_trials = s.execute(
                select(Job.reserved, Job.n_trials).where(Job.id == job_id)
            ).one()
            taken = max(0, min(k, n_trials - reserved))
            if taken:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(reserved=Job.reserved + taken, updated_at=utcnow())
                )
        return taken

    def release_slot(
        self, job_id: str, *, failed: bool = False, trial_id: int | None = None
    ) -> bool:
        """Give a slot back (its trial failed or was never asked); ``failed`` counts a trial
        failure. With the failed trial's Optuna ``trial_id`` the release marks that trial
        (SLOT_RELEASED_ATTR) in the same transaction and happens at most once per trial:
        False when it had happened already."""
        try:
            with Session(self.engine) as s, s.begin():
                if trial_id is not None:
                    marker = optuna_models.TrialSystemAttributeModel
                    s.add(marker(trial_id=trial_id, key=SLOT_RELEASED_ATTR, value_json="true"))
                    s.flush()  # an earlier or concurrent release of this trial fails here
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.reserved > 0)
                    .values(
                        reserved=Job.reserved - 1,
                        failures=Job.failures + (1 if failed else 0),
                        updated_at=utcnow(),
                    )
                )
        except IntegrityError as e:
            if trial_id is None or not is_unique_violation(e):
                raise
            return False  # released already (unique trial and key), by us or another process
        return True

    def record_finished(self, job_id: str) -> Job:
        """Count one COMPLETE/PRUNED trial; returns the updated job."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(finished=Job.finished + 1, updated_at=utcnow())
            )
            job = s.get(Job, job_id)
            assert job is not None
            s.refresh(job)
            return job

    def sync_finished(self, job_id: str, n_done: int) -> Job:
        """Raise ``finished`` to ``n_done`` (the study's COMPLETE + PRUNED count) if it is lower,
        and succeed the job in the same transaction once the count reaches its budget (from a
        state that may succeed: a cancelling job ends as its cancel says); returns the job.
        Setting a count read from the study, never adding one, makes this safe to repeat: a
        worker that told a trial and a reaper that counted it cannot both add it, and a count lost
        to a dropped connection is restored by the next call. One commit instead of a count and
        then a transition: the client following the job wakes once, to its end."""
        may_succeed = [st.value for st, nxt in TRANSITIONS.items() if JobState.SUCCEEDED in nxt]
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.finished < n_done)
                .values(finished=n_done, updated_at=utcnow())
            )
            now = utcnow()
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.finished >= Job.n_trials, Job.state.in_(may_succeed))
                .values(state=JobState.SUCCEEDED.value, updated_at=now, finished_at=now)
            )
            job = s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job with id {job_id!r}", field="job_id")
            s.refresh(job)
            return job

    def state(self, job_id: str) -> JobState:
        """The job's state alone (one column, not the row with its spec); NotFoundError if none."""
        with Session(reader(self.engine)) as s:
            found = s.scalar(select(Job.state).where(Job.id == job_id))
        if found is None:
            raise NotFoundError(f"no job with id {job_id!r}", field="job_id")
        return JobState(found)

    # Deletion ---------------------------------------------------------------------------------
    def delete(self, job_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            res = s.execute(delete(Job).where(Job.id == job_id))
            return res.rowcount == 1  # type: ignore[attr-defined]
