"""Read-side views of a job's study: trial rows, counts, best trial. Shared by API and CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from service.db.engine import reader
from service.errors import NotFoundError

MODEL_ARTIFACT_ATTR = "model_artifact_id"


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def trial_row(t: FrozenTrial, *, with_history: bool = False) -> dict[str, Any]:
    ua = t.user_attrs
    duration = ua.get("duration_s")
    if duration is None and t.datetime_start and t.datetime_complete:
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name.lower(),
        "params": t.params,
        "value": _finite(t.value) if t.state == TrialState.COMPLETE else None,
        "epochs_run": ua.get("epochs_run", len(t.intermediate_values) or None),
        "best_epoch": ua.get("best_epoch"),
        "stopped_early": ua.get("stopped_early"),
        "diverged": bool(ua.get("diverged", False)),
        "reason": ua.get("diverged_reason") or ua.get("fail_reason"),
        "duration_s": duration,
        "retry_of": t.system_attrs.get("failed_trial"),
        "train_accuracy": ua.get("train_accuracy"),
        "train_val_gap": ua.get("train_val_gap"),
        "epochs_to_target": ua.get("epochs_to_target"),
        "test_accuracy": ua.get("test_accuracy"),
    }
    if with_history:
        row["history"] = ua.get("history", [])
        row["intermediate_values"] = {
            str(k): _finite(v) for k, v in sorted(t.intermediate_values.items())
        }
        row["user_attrs"] = {k: v for k, v in ua.items() if k != "history"}
    return row


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    counts["diverged"] = sum(1 for t in trials if t.user_attrs.get("diverged"))
    return counts


@dataclass(frozen=True)
class BestRow:
    number: int
    value: float
    params: dict[str, Any]


def progress(study: optuna.Study) -> tuple[dict[str, int], BestRow | None]:
    """``state_counts`` and the ``best_trial`` summary, without loading every trial.

    A job's detail is polled (``hpo submit --wait``, dashboards, scripts) while its workers
    train; loading every trial with its attributes (each finished one keeps its learning
    curve) grew to ~100 ms of API CPU per poll at 48 trials, taken from the workers on a small
    machine. On an RDB storage this is three small queries (the state counts from
    ``service.studies.count_trials_by_state``) and one trial load; elsewhere it falls back to
    the full read. Same answers either way (tests/service/test_results.py).
    """
    from service.studies import count_trials_by_state, rdb_backend

    storage = study._storage
    backend = rdb_backend(storage)
    if backend is None:
        trials = study.get_trials(deepcopy=False)
        bt = best_trial(study)
        best = None if bt is None or bt.value is None else BestRow(bt.number, bt.value, bt.params)
        return state_counts(trials), best
    from optuna.storages._rdb import models
    from sqlalchemy import func, select

    t, ua = models.TrialModel, models.TrialUserAttributeModel
    sid = study._study_id
    counts = {state.name.lower(): 0 for state in TrialState}
    for state, n in count_trials_by_state(storage, sid).items():
        counts[state.name.lower()] = n
    with reader(backend.engine).connect() as conn:
        counts["diverged"] = int(
            conn.execute(
                select(func.count())
                .select_from(ua)
                .join(t, t.trial_id == ua.trial_id)
                .where(t.study_id == sid, ua.key == "diverged", ua.value_json == "true")
            ).scalar()
            or 0
        )
    ranked = _ranked_complete(study, backend)
    if not ranked:
        return counts, None
    top_id, top_number, top_value = ranked[0]
    return counts, BestRow(top_number, top_value, _params(backend, top_id))


def _params(backend: Any, trial_id: int) -> dict[str, Any]:
    """A trial's parameters alone, from one query on an RDB storage: Optuna's ``get_trial``
    also loads every attribute, a finished trial's whole learning curve among them (in ``hpo
    run``'s progress refresh, 48 ms of the bench's population run)."""
    from optuna.distributions import json_to_distribution
    from optuna.storages._rdb import models
    from sqlalchemy import select

    p = models.TrialParamModel
    query = (
        select(p.param_name, p.param_value, p.distribution_json)
        .where(p.trial_id == trial_id)
        .order_by(p.param_id)
    )
    with reader(backend.engine).connect() as conn:
        return {
            name: json_to_distribution(dist).to_external_repr(value)
            for name, value, dist in conn.execute(query)
        }


def _ranked_complete(study: optuna.Study, backend: Any) -> list[tuple[int, int, float]]:
    """(trial id, number, value) of every COMPLETE trial, best first in ``_rank``'s order,
    from one query on an RDB storage's tables (no trial's attributes or curve loaded)."""
    from optuna.storages._rdb import models
    from sqlalchemy import and_, select

    t, v, ua = models.TrialModel, models.TrialValueModel, models.TrialUserAttributeModel
    with reader(backend.engine).connect() as conn:
        model_attr = (
            select(ua.trial_id)
            .where(ua.key == MODEL_ARTIFACT_ATTR)
            .where(ua.trial_id == t.trial_id)
            .exists()
        )
        rows = conn.execute(
            select(t.trial_id, t.number, v.value, v.value_type, model_attr)
            .join(v, and_(v.trial_id == t.trial_id, v.objective == 0))
            .where(t.study_id == study._study_id, t.state == TrialState.COMPLETE)
        ).all()
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    values = [(row, v.stored_repr_to_value(row.value, row.value_type)) for row in rows]

    def rank(item: tuple[Any, float | None]) -> tuple[float, bool, int]:  # _rank's order
        row, value = item
        return (-(value or 0.0) if maximize else (value or 0.0), not row[4], row.number)

    return [
        (row.trial_id, row.number, value)
        for row, value in sorted(values, key=rank)
        if value is not None
    ]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial (diverged trials are PRUNED and never ranked), or None; on an
    RDB storage the only trial loaded (``top_trials``)."""
    top = top_trials(study, 1)
    return top[0] if top else None


def _rank(t: FrozenTrial, maximize: bool) -> tuple[float, bool, int]:
    """Best value first; among equal values the trial whose model was saved, then the earliest.

    Workers save weights only for a strictly new best, so with several workers a tied trial with a
    lower number can finish later without weights; ranking it first would make /best/model 404.
    """
    value = t.value or 0.0
    return (-value if maximize else value, MODEL_ARTIFACT_ATTR not in t.user_attrs, t.number)


def best_view(study: optuna.Study, *, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    t = best_trial(study)
    if t is None:
        raise NotFoundError("this job has no complete trial yet", field="best")
    ua = t.user_attrs
    return {
        "trial_number": t.number,
        "params": t.params,
        "config": {**(fixed or {}), **t.params},
        "objective": study.user_attrs.get("hpo_spec", {}).get("objective", "val_accuracy"),
        "value": t.value,
        "val_accuracy": ua.get("best_val_accuracy"),
        "val_loss": ua.get("best_val_loss"),
        "test_accuracy": ua.get("test_accuracy"),
        "best_epoch": ua.get("best_epoch"),
        "epochs_run": ua.get("epochs_run"),
        "model_artifact_id": ua.get(MODEL_ARTIFACT_ATTR),
    }


def top_trials(study: optuna.Study, k: int = 10) -> list[FrozenTrial]:
    """The ``k`` best COMPLETE trials, best first (``_rank``). On an RDB storage: one query
    ranks them and only those ``k`` are loaded (reading all 512 trials of a GPU job, each with
    its learning curve, took 0.3 s for ``hpo run``'s results table)."""
    from service.studies import rdb_backend

    backend = rdb_backend(study._storage)
    if backend is not None:
        ranked = _ranked_complete(study, backend)[:k]
        return [study._storage.get_trial(trial_id) for trial_id, _, _ in ranked]
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None
    ]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: _rank(t, maximize))
    return complete[:k]
