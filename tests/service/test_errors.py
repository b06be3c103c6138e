"""One root exception; each subclass also behaves like the built-in it resembles."""

from __future__ import annotations

import pytest

from service import errors as E


@pytest.mark.parametrize(
    ("cls", "builtin", "status"),
    [
        (E.SpecError, ValueError, 422),
        (E.DatasetError, ValueError, 400),
        (E.NotFoundError, KeyError, 404),
        (E.InvalidTransitionError, RuntimeError, 409),
        (E.ConflictError, RuntimeError, 409),
        (E.LimitExceededError, ValueError, 422),
        (E.PayloadTooLargeError, E.LimitExceededError, 413),
        (E.AuthError, PermissionError, 401),
        (E.StorageUnavailableError, ConnectionError, 503),
        (E.TrialDivergedError, ArithmeticError, 500),
    ],
)
def test_hierarchy(cls: type[E.HPOError], builtin: type[Exception], status: int) -> None:
    err = cls("broken", field="x.y")
    assert isinstance(err, E.HPOError) and isinstance(err, builtin)
    assert err.status_code == status
    assert str(err) == "x.y: broken"


def test_not_found_str_is_not_a_repr() -> None:
    assert str(E.NotFoundError("no job 'a'", field="job_id")) == "job_id: no job 'a'"


def test_a_message_naming_its_field_is_not_prefixed_twice() -> None:
    assert (
        str(E.SpecError("a.yaml:3: n_trials: bad", field="n_trials")) == "a.yaml:3: n_trials: bad"
    )


def test_too_many_jobs_carries_retry_after() -> None:
    err = E.TooManyJobsError("busy", retry_after=30)
    assert err.retry_after == 30 and err.status_code == 429
