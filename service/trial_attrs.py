"""Trial writes that must be one transaction: a trial's start (who runs it and every sampled
parameter), several user attributes at once, a failure together with its reason, and one
epoch's intermediate values of a whole population.

Optuna's public API commits each ``set_user_attr`` separately; a finished trial records about a
dozen attributes, so on SQLite that is a dozen fsync-bound commits per trial. These write
Optuna's RDB tables directly, a few statements per call whatever the number of values (pinned
optuna==5.0.0), and fall back to the public API for any other storage. Heartbeats of a whole
population are one transaction too.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import optuna
from optuna import distributions
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy import func, insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from service.studies import rdb_backend

FAIL_REASON_ATTR = "fail_reason"


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
    storage = study._storage
    trial_id = trial._trial_id
    backend = rdb_backend(storage)
    if backend is None:
        for key, value in system_attrs.items():
            storage.set_trial_system_attr(trial_id, key, value)
        for name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        _lock_running(session, [trial_id])
        _upsert_attrs(session, backend, models.TrialSystemAttributeModel, trial_id, system_attrs)
        model = models.TrialParamModel
        stored = {name for (name,) in session.query(model.param_name).filter_by(trial_id=trial_id)}
        new = [(name, value, dist) for name, value, dist in params if name not in stored]
        if not new:
            return
        # Optuna's own check, for all parameters in one query instead of one per parameter:
        # a parameter's distribution must be compatible with the study's earlier ones.
        earlier = (
            session.query(model.param_name, model.distribution_json)
            .join(models.TrialModel)
            .filter(models.TrialModel.study_id == study._study_id)
            .filter(model.param_name.in_([name for name, _, _ in new]))
            .distinct()
        )
        seen: dict[str, list[BaseDistribution]] = {}
        for name, dist_json in earlier:
            seen.setdefault(name, []).append(distributions.json_to_distribution(dist_json))
        for name, _, distribution in new:
            for previous in seen.get(name, []):
                try:
                    distributions.check_distribution_compatibility(previous, distribution)
                except ValueError as e:  # Optuna's message does not name the parameter
                    raise ValueError(f"parameter {name!r}: {e}") from e
        session.execute(  # one executemany, no per-row RETURNING of the new ids
            insert(model),
            [
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": value,
                    "distribution_json": distributions.distribution_to_json(distribution),
                }
                for name, value, distribution in new
            ],
        )


def set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Set all ``attrs`` on a running trial atomically; raises UpdateFinishedTrialError like Optuna."""
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        _lock_running(session, [trial._trial_id])
        _upsert_attrs(session, backend, models.TrialUserAttributeModel, trial._trial_id, attrs)


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
    model = models.TrialHeartbeatModel
    with _create_scoped_session(backend.scoped_session, True) as session:
        now = session.execute(func.now()).scalar()
        stmt = insert(model).values([{"trial_id": tid, "heartbeat": now} for tid in trial_ids])
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[model.trial_id], set_={"heartbeat": stmt.excluded.heartbeat}
            )
        )


def _upsert_attrs(
    session: Any, backend: Any, model: Any, trial_id: int, attrs: dict[str, Any]
) -> None:
    """Write a trial's user or system ``attrs`` (``model``) inside ``session``."""
    insert = _UPSERTS.get(backend.engine.name)
    if insert is None or not attrs:  # e.g. MySQL: Optuna's per-attribute upsert
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, model, trial_id, key, value)
        return
    # One multi-row upsert instead of a lookup and an upsert per attribute (a finished trial
    # records about a dozen); an upsert, so a retried call overwrites, as Optuna's does.
    stmt = insert(model).values(
        [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()
        ]
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": stmt.excluded.value_json},
        )
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
    query = session.query(model).filter(model.trial_id.in_(list(trial_ids))).with_for_update()
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
    if backend is None:
        for trial, step, value in values:
            trial.report(value, step)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        _lock_running(session, [trial._trial_id for trial, _, _ in values])
        insert = _UPSERTS.get(backend.engine.name)
        if insert is None:
            for trial, step, value in values:
                backend._set_trial_intermediate_value_without_commit(
                    session, trial._trial_id, step, value
                )
        else:  # one multi-row upsert on the (trial_id, step) key, as Optuna's write per value
            model = models.TrialIntermediateValueModel
            rows = []
            for trial, step, value in values:
                stored, kind = model.intermediate_value_to_stored_repr(value)
                rows.append(
                    {
                        "trial_id": trial._trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
            stmt = insert(model).values(rows)
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[model.trial_id, model.step],
                    set_={
                        "intermediate_value": stmt.excluded.intermediate_value,
                        "intermediate_value_type": stmt.excluded.intermediate_value_type,
                    },
                )
            )
    for trial, step, value in values:
        trial._cached_frozen_trial.intermediate_values[step] = value


class _AlreadyFinished(Exception):
    pass


def fail_trial(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Move a RUNNING trial to FAIL with ``fail_reason`` = ``reason``, in one transaction.

    Returns True when the trial is now failed by us: by this call, or by an earlier call with the
    same reason whose commit went through although its answer was lost (so the call is safe to
    repeat after a dropped connection). Returns False when another process finished the trial
    first, e.g. the stale-trial reaper, which never writes a fail_reason.
    """
    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None:
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
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
            row.state = TrialState.FAIL
            row.datetime_complete = datetime.now()
    except _AlreadyFinished:
        return _failed_by_us(backend.get_trial(trial_id), reason)
    return True


def _failed_by_us(frozen: optuna.trial.FrozenTrial, reason: str) -> bool:
    return frozen.state == TrialState.FAIL and frozen.user_attrs.get(FAIL_REASON_ATTR) == reason
