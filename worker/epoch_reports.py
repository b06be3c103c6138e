"""Running trials' intermediate values, written together at most once per interval.

Each epoch of a stack gives every member an intermediate value. Writing them after each epoch
(one commit per stack and epoch, plus one per epoch for a stack pruned down to one member) was
the largest single storage cost of a population run; a lone (sequential) trial's values go
the same way instead of a commit per epoch. The values wait here instead, and in each
trial's cached copy, so its own pruning checks see them at once, until either:

- ``interval_s`` has passed since the last write: all pending values go in one commit, so a
  dashboard's curves of running trials lag by at most about that;
- the member is told: its pending values go in the tell's own transaction
  (``service.trial_attrs.Tell.intermediate_values``), so a finished trial's curve is whole and
  a PRUNED trial's value is its last one, as Optuna stores it.

Nothing another worker decides on waits: the pruners read COMPLETE trials only, and those are
written whole. What a worker that dies loses is at most an interval of a running trial's curve,
a trial the stale-trial reaper fails and re-queues anyway. A member that training stops for
another reason (a stop, a cancel, an error) gets its pending values written on their own
(``write_trial``) before it is failed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from service.db.retry import is_transient
from service.trial_attrs import set_intermediate_values

log = logging.getLogger(__name__)

# ``TrialContext.retry``: call fn, riding out a database outage; ``what`` names it in errors.
Retry = Callable[[Callable[[], Any], str], Any]


class EpochReports:
    """Intermediate values of running trials that are reported but not written yet."""

    def __init__(self, study: optuna.Study, interval_s: float) -> None:
        self.study = study
        self.interval_s = interval_s
        self._pending: dict[int, dict[int, float]] = {}  # trial id -> step -> value
        self._trials: dict[int, optuna.Trial] = {}
        self._errors: dict[int, Exception] = {}  # a member's failed write, for its epoch hook
        self._written_at = time.monotonic()

    def add(self, values: Sequence[tuple[optuna.Trial, int, float]]) -> None:
        """Report ``(trial, step, value)``: kept in the trial's cached copy now (what its
        pruning checks read, as after ``Trial.report``), written later."""
        for trial, step, value in values:
            trial._cached_frozen_trial.intermediate_values[step] = value
            self._pending.setdefault(trial._trial_id, {})[step] = value
            self._trials[trial._trial_id] = trial

    def report(self, values: Sequence[tuple[optuna.Trial, int, float]], retry: Retry) -> None:
        """``add`` the values, then ``write`` all that is pending once the interval has passed."""
        self.add(values)
        if self.due():
            self.write(retry)

    def due(self) -> bool:
        return bool(self._pending) and time.monotonic() - self._written_at >= self.interval_s

    def take(self, trial: optuna.Trial) -> dict[int, float]:
        """The trial's pending values, removed: the caller writes them (in its tell)."""
        return self._pending.pop(trial._trial_id, {})

    def write(self, retry: Retry) -> None:
        """Write every pending value in one commit. Should that fail (a member failed elsewhere,
        the database away), each member's values are written on their own with ``retry``, and a
        member whose write still fails gets the error from ``raise_error`` in its epoch hook, to
        end alone as it would have writing its own report."""
        pending, self._pending = self._pending, {}
        self._written_at = time.monotonic()
        rows = self._rows(pending)
        if not rows:
            return
        try:
            set_intermediate_values(self.study, rows)
            return
        except Exception as e:
            log.debug("batched epoch report failed (%s); writing member by member", e)
        for trial_id, steps in pending.items():
            trial = self._trials[trial_id]
            try:
                retry(
                    functools.partial(
                        set_intermediate_values, self.study, self._rows({trial_id: steps})
                    ),
                    f"reporting trial {trial.number}",
                )
            except Exception as e:
                self._errors[trial_id] = e

    def raise_error(self, trial: optuna.Trial) -> None:
        """Raise what writing this trial's values ran into, once."""
        error = self._errors.pop(trial._trial_id, None)
        if error is not None:
            raise error

    def write_trial(self, trial: optuna.Trial, exc: BaseException) -> None:
        """Best effort, before a trial that ``exc`` stopped is failed: its pending values, so
        its curve shows how far it got. Skipped when ``exc`` says the trial is finished
        elsewhere or the database is away: a write would fail, or wait out the outage.

        Every member's pending values go in the same commit: stack-mates usually stop together
        (a SIGTERM, a cancel), and a commit per member would spend a GPU stack's stop grace.
        Should that fail (another member lost), the others' values wait as before and this
        trial's are written alone.
        """
        own = self.take(trial)
        if not own or isinstance(exc, UpdateFinishedTrialError) or is_transient(exc):
            return
        others, self._pending = self._pending, {}
        if others:
            try:
                set_intermediate_values(self.study, self._rows({trial._trial_id: own, **others}))
                self._written_at = time.monotonic()
                return
            except Exception as e:
                log.debug("epoch reports of a stopping stack not written together (%s)", e)
                self._pending = others
        try:
            set_intermediate_values(self.study, self._rows({trial._trial_id: own}))
        except Exception as e:  # the failure being recorded matters more than its curve
            log.debug("trial %d: its last epoch reports were not written (%s)", trial.number, e)

    def _rows(self, pending: dict[int, dict[int, float]]) -> list[tuple[optuna.Trial, int, float]]:
        return [
            (self._trials[trial_id], step, value)
            for trial_id, steps in pending.items()
            for step, value in steps.items()
        ]
