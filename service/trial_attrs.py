"""Write several trial user attributes in one transaction (one commit instead of one per key).

Optuna's public API commits each ``set_user_attr`` separately; a finished trial records about a
dozen attributes, so on SQLite that is a dozen fsync-bound commits per trial. This uses the RDB
storage's own per-attribute upsert inside a single session (pinned optuna==5.0.0) and falls back
to the public API for any other storage.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session


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
