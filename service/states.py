"""The job lifecycle: one enum, one transition table, one guarded function."""

from __future__ import annotations

from enum import StrEnum

from service.errors import InvalidTransitionError


class JobState(StrEnum):
    # Persisted values: only ever add, never rename.
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(
        {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}
    ),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    JobState.CANCELLED: frozenset(),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
}

ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
RUNNABLE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
TERMINAL_STATES = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def check_transition(current: JobState | str, target: JobState | str) -> JobState:
    """Return ``target`` if ``current -> target`` is allowed, else raise InvalidTransitionError."""
    cur, tgt = JobState(current), JobState(target)
    if tgt not in TRANSITIONS[cur]:
        allowed = ", ".join(sorted(TRANSITIONS[cur])) or "none (terminal state)"
        raise InvalidTransitionError(
            f"cannot move a job from {cur.value} to {tgt.value}; allowed from {cur.value}: {allowed}",
            field="state",
        )
    return tgt
