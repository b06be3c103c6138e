"""The job state machine: every allowed and every disallowed transition."""

from __future__ import annotations

import itertools

import pytest

from service.errors import HPOError, InvalidTransitionError
from service.states import (
    ACTIVE_STATES,
    RUNNABLE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
    check_transition,
)

S = JobState
ALLOWED = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.FAILED),
    (S.QUEUED, S.SUCCEEDED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLING),
    (S.CANCELLING, S.CANCELLED),
}
ALL_PAIRS = list(itertools.product(JobState, JobState))


def test_persisted_values_never_change() -> None:
    assert [s.value for s in JobState] == [
        "queued",
        "running",
        "cancelling",
        "cancelled",
        "succeeded",
        "failed",
    ]


def test_table_is_exactly_the_documented_one() -> None:
    assert {(a, b) for a, nxt in TRANSITIONS.items() for b in nxt} == ALLOWED
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED), ids=lambda s: s.value)
def test_allowed(current: JobState, target: JobState) -> None:
    assert check_transition(current, target) is target
    assert check_transition(current.value, target.value) is target  # persisted strings too


@pytest.mark.parametrize(
    ("current", "target"), [p for p in ALL_PAIRS if p not in ALLOWED], ids=lambda s: s.value
)
def test_disallowed_raises_a_named_error(current: JobState, target: JobState) -> None:
    with pytest.raises(InvalidTransitionError) as info:
        check_transition(current, target)
    err = info.value
    assert isinstance(err, HPOError) and isinstance(err, RuntimeError)
    assert err.status_code == 409
    assert err.field == "state"
    assert f"from {current.value} to {target.value}" in str(err)


def test_state_sets() -> None:
    assert {S.CANCELLED, S.SUCCEEDED, S.FAILED} == TERMINAL_STATES
    assert {S.QUEUED, S.RUNNING, S.CANCELLING} == ACTIVE_STATES
    assert {S.QUEUED, S.RUNNING} == RUNNABLE_STATES
    assert not (ACTIVE_STATES & TERMINAL_STATES)


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError):
        check_transition("paused", "running")
