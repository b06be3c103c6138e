"""Trial writes that must be one transaction: several user attributes at once, and a failure
together with its reason.

Optuna's public API commits each ``set_user_attr`` separately; a finished trial records about a
dozen attributes, so on SQLite that is a dozen fsync-bound commits per trial. This uses the RDB
storage's own per-attribute upsert inside a single session (pinned optuna==5.0.0) and falls back
to the public API for any other storage.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

FAIL_REASON_ATTR = "fail_reason"


def set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Set all ``attrs`` on a running trial atomically; raises UpdateFinishedTrialError like Optuna."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, RDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial._trial_id, key, value
            )


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
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, RDBStorage):
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
