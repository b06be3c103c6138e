"""Trial writes that must be one transaction: a population's new trials, a trial's start (who
runs it and every sampled parameter), one epoch's intermediate values of a whole population,
its members' results with their user attributes (``tell_trials``), and a failure together
with its reason.

Optuna's public API commits each ``set_user_attr`` separately; a finished trial records about a
dozen attributes, so on SQLite that is a dozen fsync-bound commits per trial. These write
Optuna's RDB tables directly, a few statements per call whatever the number of values (pinned
optuna==5.0.0), and fall back to the public API for any other storage. Heartbeats of a whole
population are one transaction too.
"""

from __future__ import annotations

import copy
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna import distributions
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.pruners import _filter_study
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from service.db.jobs import SLOT_RELEASED_ATTR, is_unique_violation
from service.studies import rdb_backend

FAIL_REASON_ATTR = "fail_reason"
# A trial its worker fails owes two more writes: its re-queued copy (when asked for) and its
# budget slot's release. fail_trial records which in the failure's own transaction, and the
# release marks itself in its own (JobStore.release_slot), so a worker killed between them
# leaves a failed trial that says what is still owed: the reaper pays it
# (worker.loop.Worker._settle_failures). "at" is the failure's Unix time: comparable across
# hosts whatever their time zones, as the naive local datetime_complete is not.
FAIL_SETTLE_ATTR = "hpo_fail_settle"  # system attribute: {"requeue", "failed", "at"}
# Written on a failed trial in the same transaction as its re-queued WAITING copy, so the copy
# is made once whoever tries (the worker, a reaper, both during an outage): unique (trial, key).
REQUEUED_ATTR = "hpo_requeued"
REQUEUE_OF_ATTR = "hpo_requeue_of"  # on a WAITING copy: the number of the attempt it replaces
# Bookkeeping of one attempt: a re-queued copy of the trial must not inherit it.
ATTEMPT_ATTRS = (FAIL_SETTLE_ATTR, SLOT_RELEASED_ATTR, REQUEUED_ATTR)


# A sampled parameter as Optuna stores it: (name, value in internal representation, distribution).
PendingParam = tuple[str, float, BaseDistribution]


class _HeldParams:
    """A trial's storage, except that ``set_trial_param`` is held back in ``pending``."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.pending: list[PendingParam] = []

    def set_trial_param(
        self, trial_id: int, name: str, value: float, distribution: BaseDistribution
    ) -> None:
        self.pending.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextmanager
def held_params(trial: optuna.Trial) -> Iterator[list[PendingParam]]:
    """Sample inside this block without writing: the trial's ``suggest_*`` calls return their
    values (and the trial caches them, as usual) but the writes are collected in the yielded
    list, for ``start_trial`` to write in one transaction.

    Sampling never reads the current trial's parameters back from storage (Optuna's
    ``Trial._suggest`` keeps them in the trial's own cache; samplers read other trials), so
    holding the writes changes no sampled value.
    """
    held = _HeldParams(trial.storage)
    trial.storage = held  # type: ignore[assignment]  # duck-typed: everything else forwarded
    try:
        yield held.pending
    finally:
        trial.storage = held._storage


def create_trials(study: optuna.Study, n: int) -> list[int]:
    """``n`` new RUNNING trials in one transaction (Optuna's ``create_new_trial`` each took its
    own: 2.5 ms apiece on SQLite, 28 ms for a population of 11); their ids, in number order.
    ``new_trials`` makes the same trials and hands them back as ``optuna.Trial`` objects.

    On a storage with heartbeats the same transaction records each trial's first beat
    (``_beat_in``): a RUNNING trial without a beat is never judged stale, so a worker killed
    between creating its trials and its heartbeat thread's first beat left them RUNNING for
    good, holding their job's budget.

    Numbered as Optuna numbers them (trials of the study before each one) under the same
    study-row lock, and added to Optuna's trial cache as its ``create_new_trial`` adds one, so
    the cached storage's own methods know them. (``optuna.Trial(study, id)`` still reads each
    back: Optuna's cache serves finished trials only; ``new_trials`` does not.)
    """
    return [t._trial_id for t in _create_frozen(study, n)]


def new_trials(study: optuna.Study, n: int) -> list[optuna.Trial]:
    """``create_trials``, as the ``optuna.Trial`` objects that ``Study.ask`` returns.

    ``optuna.Trial(study, id)`` reads its trial back from the database, one query each: 2.3 ms
    apiece on SQLite, a tenth of a second for the bench's 48 trials. These are built from the
    trials just written, with the steps of ``Trial.__init__`` (pinned optuna==5.0.0;
    tests/service/test_trial_attrs.py compares the two attribute by attribute).
    """
    created = _create_frozen(study, n)
    study._thread_local.cached_all_trials = None  # as Study.ask: new trials, a fresh view
    return [_trial_of(study, frozen) for frozen in created]


def _trial_of(study: optuna.Study, frozen: FrozenTrial) -> optuna.Trial:
    """``optuna.Trial(study, frozen._trial_id)`` without the read: what its ``__init__`` does."""
    trial = optuna.Trial.__new__(optuna.Trial)
    trial.study = study
    trial._trial_id = frozen._trial_id
    trial.storage = study._storage
    trial._cached_frozen_trial = copy.deepcopy(frozen)  # its own, as a read would give it
    study.sampler.before_trial(_filter_study(study, frozen), trial._cached_frozen_trial)
    trial.relative_search_space = None
    trial._relative_params = None
    trial._fixed_params = frozen.system_attrs.get("fixed_params", {})
    return trial


def _create_frozen(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """The new trials of ``create_trials``, as Optuna's trial cache holds them."""
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None or not isinstance(storage, _CachedStorage) or n < 1:
        return [storage.get_trial(storage.create_new_trial(study._study_id)) for _ in range(n)]
    study_id = study._study_id
    with _create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        now = datetime.now()  # Optuna's datetime_start: local, naive
        rows = [
            models.TrialModel(
                study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=now
            )
            for _ in range(n)
        ]
        session.add_all(rows)
        session.flush()
        # Optuna numbers a trial by counting the study's trials before it; under the lock no
        # other trial of the study comes between these, so one count numbers them all.
        first = rows[0].count_past_trials(session)
        for i, row in enumerate(rows):
            row.number = first + i
        _beat_in(session, backend, [int(row.trial_id) for row in rows])
        created = [
            FrozenTrial(
                number=int(row.number),
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=now,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=int(row.trial_id),
            )
            for row in rows
        ]
    with storage._lock:  # what _CachedStorage.create_new_trial does with the trial it made
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, created)
    return created


def start_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    system_attrs: dict[str, Any],
    params: Sequence[PendingParam],
) -> None:
    """Record a running trial's start in one transaction: ``system_attrs`` (which worker runs
    it) and its sampled ``params`` (from ``held_params``).

    Readers see the trial claimed with all its parameters or neither, and on SQLite it is one
    commit instead of one per parameter plus one for the claim. Safe to repeat after a lost
    answer: parameters already stored for the trial are skipped. Raises
    UpdateFinishedTrialError, writing nothing, if the trial is finished.
    """
    start_trials(study, [(trial, system_attrs, params)])


def start_trials(
    study: optuna.Study,
    starts: Sequence[tuple[optuna.Trial, dict[str, Any], Sequence[PendingParam]]],
) -> None:
    """``start_trial`` for several trials (a population) in one transaction, all or none.

    A population of 11 took 11 commits of about 2.5 ms each on SQLite; now one. Raises
    UpdateFinishedTrialError, writing nothing, if any of the trials is finished: the caller
    can then start them one by one to find which.
    """
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None:
        for trial, system_attrs, params in starts:
            for key, value in system_attrs.items():
                storage.set_trial_system_attr(trial._trial_id, key, value)
            for name, value, distribution in params:
                storage.set_trial_param(trial._trial_id, name, value, distribution)
        return
    ids = [trial._trial_id for trial, _, _ in starts]
    if not ids:
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        _lock_running(session, ids)
        _upsert_many_attrs(
            session,
            backend,
            models.TrialSystemAttributeModel,
            [(trial._trial_id, attrs) for trial, attrs, _ in starts],
        )
        model = models.TrialParamModel
        stored = set(
            session.query(model.trial_id, model.param_name).filter(model.trial_id.in_(ids))
        )
        new = [
            (trial._trial_id, name, value, dist)
            for trial, _, params in starts
            for name, value, dist in params
            if (trial._trial_id, name) not in stored
        ]
        if not new:
            return
        # Optuna's own check, for all parameters in one query instead of one per parameter:
        # a parameter's distribution must be compatible with the study's earlier ones.
        earlier = (
            session.query(model.param_name, model.distribution_json)
            .join(models.TrialModel)
            .filter(models.TrialModel.study_id == study._study_id)
            .filter(model.param_name.in_({name for _, name, _, _ in new}))
            .distinct()
        )
        seen: dict[str, list[BaseDistribution]] = {}
        for name, dist_json in earlier:
            seen.setdefault(name, []).append(distributions.json_to_distribution(dist_json))
        checked: set[tuple[str, str]] = set()
        for _, name, _, distribution in new:
            as_json = distributions.distribution_to_json(distribution)
            if (name, as_json) in checked:
                continue
            checked.add((name, as_json))
            for previous in seen.get(name, []):
                try:
                    distributions.check_distribution_compatibility(previous, distribution)
                except ValueError as e:  # Optuna's message does not name the parameter
                    raise ValueError(f"parameter {name!r}: {e}") from e
            seen.setdefault(name, []).append(distribution)  # later members are checked too
        session.execute(  # one executemany, no per-row RETURNING of the new ids
            insert(model),
            [
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": value,
                    "distribution_json": distributions.distribution_to_json(distribution),
                }
                for trial_id, name, value, distribution in new
            ],
        )


def record_heartbeats(storage: optuna.storages.BaseStorage, trial_ids: Sequence[int]) -> None:
    """Optuna's ``record_heartbeat`` for several trials (a population) in one transaction.

    Optuna's own call is a transaction of two or three statements per trial; a worker beating
    for P trials would run P of them every interval from its heartbeat thread, beside training.
    The time is the database's clock, read and then written as a bound value as Optuna's
    update does: on SQLite a raw ``CURRENT_TIMESTAMP`` (Optuna's first beat) is stored without
    the fractional seconds that a bound datetime has, and the stale-trial check compares those as strings
    (``"12:00:05" < "12:00:05.000000"``), so it would judge a beat up to a second early."""
    backend = rdb_backend(storage)
    insert = None if backend is None else _UPSERTS.get(backend.engine.name)
    if backend is None or insert is None or not trial_ids:
        for trial_id in trial_ids:
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        _beat_in(session, backend, trial_ids, always=True)


def _beat_in(session: Any, backend: Any, trial_ids: Sequence[int], *, always: bool = False) -> None:
    """Upsert the trials' heartbeats inside ``session``, on the database's clock (see
    ``record_heartbeats``); unless ``always``, only when the storage has heartbeats on."""
    upsert = _UPSERTS.get(backend.engine.name)
    if not trial_ids or upsert is None or not (always or backend.heartbeat_interval):
        return
    model = models.TrialHeartbeatModel
    now = session.execute(func.now()).scalar()
    _upsert_rows(
        session,
        upsert,
        model,
        ("trial_id",),
        [{"trial_id": t, "heartbeat": now} for t in trial_ids],
    )


def claim_waiting_trial(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Turn a WAITING trial RUNNING, as Optuna's ``set_trial_state_values`` does (False when
    another worker claimed it first; UpdateFinishedTrialError when it is finished), with its
    first heartbeat in the same transaction, as ``create_trials`` records new trials' beats."""
    backend = rdb_backend(storage)
    if backend is None or _UPSERTS.get(backend.engine.name) is None:
        return bool(storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
    with _create_scoped_session(backend.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if trial.state.is_finished():  # as Optuna's check_trial_is_updatable
            raise UpdateFinishedTrialError(f"trial {trial_id} has already finished")
        if trial.state != TrialState.WAITING:
            return False
        trial.state = TrialState.RUNNING
        trial.datetime_start = datetime.now()  # Optuna's: local, naive
        _beat_in(session, backend, [trial_id])
    return True


def _upsert_many_attrs(
    session: Any, backend: Any, model: Any, attrs_by_trial: Sequence[tuple[int, dict[str, Any]]]
) -> None:
    """Write user or system attributes (``model``) of several trials inside ``session``."""
    insert = _UPSERTS.get(backend.engine.name)
    rows = [
        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
        for trial_id, attrs in attrs_by_trial
        for key, value in attrs.items()
    ]
    if insert is None or not rows:  # e.g. MySQL: Optuna's per-attribute upsert
        for trial_id, attrs in attrs_by_trial:
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(session, model, trial_id, key, value)
        return
    # One upsert for all instead of a lookup and an upsert per attribute (a finished trial
    # records about a dozen); an upsert, so a retried call overwrites, as Optuna's does.
    _upsert_rows(session, insert, model, ("trial_id", "key"), rows)


def _upsert_rows(
    session: Any, upsert: Any, model: Any, keys: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """INSERT ``rows`` into ``model``'s table, updating the other columns of rows whose
    ``keys`` exist, as one executemany. The statement is the same whatever the rows, so
    SQLAlchemy compiles it once per process: a multi-row VALUES list was compiled afresh for
    every call (a population's tell took 8.8 ms that way on SQLite, 3.2 ms like this)."""
    if not rows:
        return
    stmt = upsert(model)
    others = [column for column in rows[0] if column not in keys]
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[getattr(model, key) for key in keys],
            set_={column: stmt.excluded[column] for column in others},
        ),
        rows,
    )


# Dialects with INSERT ... ON CONFLICT DO UPDATE (SQLite >= 3.24, PostgreSQL).
_UPSERTS: dict[str, Any] = (
    {"sqlite": sqlite_insert, "postgresql": postgresql_insert}
    if sqlite3.sqlite_version_info >= (3, 24, 0)
    else {"postgresql": postgresql_insert}
)


def _lock_running(session: Any, trial_ids: Sequence[int]) -> None:
    """Raise UpdateFinishedTrialError unless every trial is still running (rows locked).

    Checked before any write: Optuna's own check, on a finished trial, reads it through the
    same thread-local session and so commits whatever was written before it.
    """
    model = models.TrialModel
    # The three columns it needs, not the ORM objects (a stack's P trials, every epoch).
    query = (
        session.query(model.trial_id, model.number, model.state)
        .filter(model.trial_id.in_(list(trial_ids)))
        .with_for_update()
    )
    rows = {row.trial_id: row for row in query}
    for trial_id in trial_ids:
        row = rows.get(trial_id)
        if row is None:
            raise KeyError(f"no trial with id {trial_id}")  # as Optuna's find_or_raise_by_id
        if row.state.is_finished():
            raise UpdateFinishedTrialError(
                f"trial {row.number} is already finished ({row.state.name}); nothing written"
            )


def set_intermediate_values(
    study: optuna.Study, values: Sequence[tuple[optuna.Trial, int, float]]
) -> None:
    """Report ``(trial, step, value)`` for several running trials in one transaction.

    What ``Trial.report`` writes, one commit for all instead of one per trial (a population
    reports all its members after each epoch). All or nothing: if any trial is finished
    already (UpdateFinishedTrialError) nothing is written. Each trial's own cached copy is
    updated as ``Trial.report`` does, so its pruning checks see the values.
    """
    storage = study._storage
    backend = rdb_backend(storage)
    rows = [(trial._trial_id, step, value) for trial, step, value in values]
    if backend is None:
        # The storage's own write, not Trial.report: that skips a step already in the
        # trial's cached copy, where a buffered report (worker.epoch_reports) puts it first.
        for trial_id, step, value in rows:
            storage.set_trial_intermediate_value(trial_id, step, value)
    else:
        with _create_scoped_session(backend.scoped_session, True) as session:
            _lock_running(session, [trial_id for trial_id, _, _ in rows])
            _write_intermediate_values(session, backend, rows)
    for trial, step, value in values:
        trial._cached_frozen_trial.intermediate_values[step] = value


def _write_intermediate_values(
    session: Any, backend: RDBStorage, rows: Sequence[tuple[int, int, float]]
) -> None:
    """Write ``(trial_id, step, value)`` rows in an open transaction, as Optuna's
    ``set_trial_intermediate_value`` does one by one: an upsert on (trial_id, step)."""
    insert = _UPSERTS.get(backend.engine.name)
    if insert is None:
        for trial_id, step, value in rows:
            backend._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
        return
    model = models.TrialIntermediateValueModel
    records = []
    for trial_id, step, value in rows:
        stored, kind = model.intermediate_value_to_stored_repr(value)
        records.append(
            {
                "trial_id": trial_id,
                "step": step,
                "intermediate_value": stored,
                "intermediate_value_type": kind,
            }
        )
    _upsert_rows(session, insert, model, ("trial_id", "step"), records)


@dataclass(frozen=True)
class Tell:
    """A trained trial's result: its final state, value and user attributes, and the
    intermediate values (step: value) it reported that are not written yet."""

    trial_id: int
    state: TrialState  # COMPLETE (with ``value``) or PRUNED
    value: float | None = None
    user_attrs: dict[str, Any] = field(default_factory=dict)
    intermediate_values: dict[int, float] = field(default_factory=dict)


def tell_trials(study: optuna.Study, tells: Sequence[Tell]) -> list[bool]:
    """Record and tell several trials in one transaction: each one's user attributes, state and
    value, what ``Trial.set_user_attr`` and ``Study.tell`` write, for a population's members at once.

    Returns, per trial, whether it is now finished by us: told by this call, or found COMPLETE
    or PRUNED, which only its own worker can have done (by an earlier call whose answer was
    lost, so the call is safe to repeat). A trial found FAIL (the stale-trial reaper failed it)
    is not written and gets False. A PRUNED trial's value is its last intermediate value, as
    Optuna's tell stores. What Optuna's tell does besides is not needed here: the samplers the
    service builds (``make_sampler``) have no ``after_trial`` work (tested), and the told
    trial is not read back.
    """
    for t in tells:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            raise ValueError(f"trial id {t.trial_id}: can tell COMPLETE or PRUNED, not {t.state}")
        if t.state == TrialState.COMPLETE and (t.value is None or math.isnan(t.value)):
            raise ValueError(
                f"trial id {t.trial_id}: a COMPLETE trial needs a value, not {t.value}"
            )
    if not tells:
        return []
    storage = study._storage
    backend = rdb_backend(storage)
    study._thread_local.cached_all_trials = None  # as Study.tell: trials changed
    if backend is None:
        return [_tell_one(study, t) for t in tells]
    ids = [t.trial_id for t in tells]
    with _create_scoped_session(backend.scoped_session, True) as session:
        trials = models.TrialModel
        states = dict(
            session.query(trials.trial_id, trials.state)
            .filter(trials.trial_id.in_(ids))
            .with_for_update()
        )
        for t in tells:
            state = states.get(t.trial_id)
            if state is None:
                raise KeyError(f"no trial with id {t.trial_id}")
            if not state.is_finished() and state != TrialState.RUNNING:
                raise ValueError(f"Cannot tell a {state.name} trial (id {t.trial_id}).")
        todo = [t for t in tells if states[t.trial_id] == TrialState.RUNNING]
        if todo:
            _write_intermediate_values(  # first: a PRUNED trial's value is its last one
                session,
                backend,
                [(t.trial_id, s, v) for t in todo for s, v in t.intermediate_values.items()],
            )
            values = {t.trial_id: t.value for t in todo if t.state == TrialState.COMPLETE}
            pruned = [t for t in todo if t.state == TrialState.PRUNED]
            values.update(_last_intermediate_values(session, pruned))
            _upsert_many_attrs(
                session,
                backend,
                models.TrialUserAttributeModel,
                [(t.trial_id, t.user_attrs) for t in todo if t.user_attrs],
            )
            value_rows = []
            for trial_id, value in values.items():
                if value is None:
                    continue
                stored, kind = models.TrialValueModel.value_to_stored_repr(float(value))
                value_rows.append(
                    {"trial_id": trial_id, "objective": 0, "value": stored, "value_type": kind}
                )
            if value_rows:
                session.execute(insert(models.TrialValueModel), value_rows)
            # The mapped attribute behind Optuna's datetime_complete property: naive UTC, as
            # its setter stores (a bulk update by primary key takes mapped attributes only).
            now = datetime.now(UTC).replace(tzinfo=None)
            session.execute(  # one executemany, by primary key
                update(trials),
                [
                    {"trial_id": t.trial_id, "state": t.state, "_datetime_complete_utc": now}
                    for t in todo
                ],
            )
    return [
        states[t.trial_id] == TrialState.RUNNING
        or states[t.trial_id] in (TrialState.COMPLETE, TrialState.PRUNED)
        for t in tells
    ]


def _last_intermediate_values(session: Any, pruned: Sequence[Tell]) -> dict[int, float | None]:
    """The value Optuna's tell gives a PRUNED trial: its last step's intermediate value, if it
    has one that is not NaN."""
    if not pruned:
        return {}
    model = models.TrialIntermediateValueModel
    last: dict[int, tuple[int, float]] = {}
    rows = session.query(
        model.trial_id, model.step, model.intermediate_value, model.intermediate_value_type
    ).filter(model.trial_id.in_([t.trial_id for t in pruned]))
    for trial_id, step, stored, kind in rows:
        if trial_id not in last or step > last[trial_id][0]:
            last[trial_id] = (step, model.stored_repr_to_intermediate_value(stored, kind))
    out: dict[int, float | None] = {t.trial_id: None for t in pruned}
    for trial_id, (_, value) in last.items():
        out[trial_id] = None if math.isnan(value) else value
    return out


def _tell_one(study: optuna.Study, t: Tell) -> bool:
    """``tell_trials`` for one trial through Optuna's public API (storages other than RDB)."""
    storage = study._storage
    try:
        for step, intermediate in t.intermediate_values.items():
            storage.set_trial_intermediate_value(t.trial_id, step, intermediate)
        for key, value in t.user_attrs.items():
            storage.set_trial_user_attr(t.trial_id, key, value)
        if t.state == TrialState.COMPLETE:
            _tell_with_warning(study, t.trial_id, t.value)
        else:
            _tell_with_warning(study, t.trial_id, state=t.state)
    except (UpdateFinishedTrialError, ValueError):
        state = storage.get_trial(t.trial_id).state
        if not state.is_finished():
            raise
        return state != TrialState.FAIL
    return True


class _AlreadyFinished(Exception):
    pass


def fail_trial(
    study: optuna.Study,
    trial_id: int,
    reason: str,
    *,
    requeue: bool = False,
    counts_as_failure: bool = False,
) -> bool:
    """Move a RUNNING trial to FAIL with ``fail_reason`` = ``reason``, in one transaction, with
    what must follow it (FAIL_SETTLE_ATTR: whether it is re-queued, whether its slot's
    release counts as a failure of the job).

    Returns True when the trial is now failed by us: by this call, or by an earlier call with the
    same reason whose commit went through although its answer was lost (so the call is safe to
    repeat after a dropped connection). Returns False when another process finished the trial
    first, e.g. the stale-trial reaper, which never writes a fail_reason.
    """
    settle = {"requeue": requeue, "failed": counts_as_failure, "at": time.time()}
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None:
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
            storage.set_trial_system_attr(trial_id, FAIL_SETTLE_ATTR, settle)
            return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
        except UpdateFinishedTrialError:
            return _failed_by_us(storage.get_trial(trial_id), reason)
    try:
        with _create_scoped_session(backend.scoped_session) as session:
            row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            if row.state.is_finished():
                raise _AlreadyFinished
            backend._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, FAIL_REASON_ATTR, reason
            )
            backend._set_trial_attr_without_commit(
                session, models.TrialSystemAttributeModel, trial_id, FAIL_SETTLE_ATTR, settle
            )
            row.state = TrialState.FAIL
            row.datetime_complete = datetime.now()
    except _AlreadyFinished:
        return _failed_by_us(backend.get_trial(trial_id), reason)
    return True


def _failed_by_us(frozen: optuna.trial.FrozenTrial, reason: str) -> bool:
    return frozen.state == TrialState.FAIL and frozen.user_attrs.get(FAIL_REASON_ATTR) == reason


def add_requeued_copy(study: optuna.Study, failed_trial_id: int, template: FrozenTrial) -> bool:
    """Add ``template`` (a WAITING trial) as the re-queued copy of ``failed_trial_id``, once:
    the failed trial is marked (REQUEUED_ATTR) in the copy's transaction. False when it had
    been re-queued already (by this caller before a lost answer, by another process)."""
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None or not isinstance(storage, _CachedStorage):
        # Other storages (in memory: one process) cannot mark a finished trial: the copy is
        # found by the REQUEUE_OF_ATTR it carries.
        number = storage.get_trial(failed_trial_id).number
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        if any(t.system_attrs.get(REQUEUE_OF_ATTR) == number for t in trials):
            return False
        storage.create_new_trial(study._study_id, template_trial=template)
        return True
    study_id = study._study_id
    try:
        with _create_scoped_session(backend.scoped_session) as session:
            # Optuna's lock for numbering a new trial; it also orders concurrent re-queuers.
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            session.add(
                models.TrialSystemAttributeModel(
                    trial_id=failed_trial_id, key=REQUEUED_ATTR, value_json="true"
                )
            )
            session.flush()  # a second copy of the same trial fails here
            row = backend._get_prepared_new_trial(study_id, template, session)
            created = copy.deepcopy(template)  # as Optuna's _create_new_trial returns it
            created.number, created._trial_id = int(row.number), int(row.trial_id)
            created.datetime_start = row.datetime_start
    except IntegrityError as e:
        if not is_unique_violation(e):
            raise
        return False
    with storage._lock:  # what _CachedStorage.create_new_trial does with the trial it made
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [created])
    return True


@dataclass(frozen=True)
class Unsettled:
    """A trial its worker failed whose slot was never released (the worker died in between)."""

    trial_id: int
    number: int
    requeue: bool
    counts_as_failure: bool
    reason: str
    failed_at: float  # Unix time


def unsettled_failures(study: optuna.Study, failed_before: float) -> list[Unsettled]:
    """Trials of ``study`` failed by their worker before ``failed_before`` (Unix time) that
    still owe their slot's release: one query (see FAIL_SETTLE_ATTR)."""
    backend = rdb_backend(study._storage)
    if backend is None:
        return []
    T, S, U = models.TrialModel, models.TrialSystemAttributeModel, models.TrialUserAttributeModel
    R = aliased(S)  # the release marker, beside the FAIL_SETTLE_ATTR row joined below
    released = (
        select(R.trial_id).where(R.trial_id == T.trial_id, R.key == SLOT_RELEASED_ATTR).exists()
    )
    reason = (
        select(U.value_json)
        .where(U.trial_id == T.trial_id, U.key == FAIL_REASON_ATTR)
        .scalar_subquery()
    )
    query = (
        select(T.trial_id, T.number, S.value_json, reason)
        .join(S, (S.trial_id == T.trial_id) & (S.key == FAIL_SETTLE_ATTR))
        .where(
            T.study_id == study._study_id,
            T.state == TrialState.FAIL,
            ~released,
        )
        .order_by(T.number)
    )
    with _create_scoped_session(backend.scoped_session) as session:
        rows = session.execute(query).all()
    out = []
    for trial_id, number, settle_json, reason_json in rows:
        settle = json.loads(settle_json)
        failed_at = float(settle.get("at", 0.0))
        if failed_at >= failed_before:
            continue  # still its own worker's to finish
        out.append(
            Unsettled(
                trial_id=trial_id,
                number=number,
                requeue=bool(settle.get("requeue")),
                counts_as_failure=bool(settle.get("failed")),
                reason=json.loads(reason_json) if reason_json else "",
                failed_at=failed_at,
            )
        )
    return out
