"""One root exception for the project; each subclass also extends the built-in it behaves like.

The API maps these to HTTP statuses in one handler (``service.api.problems``) and answers them
as RFC 9457 problem details. ``field`` names where the problem is (a dotted path in the job spec,
a file and line, a form field) so every message says what was wrong and where.
"""

from __future__ import annotations


class HPOError(Exception):
    """Root of every error this project raises on purpose."""

    status_code = 500
    title = "Internal error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        # A message that already names its field ("a.yaml:3: n_trials: ...") is not prefixed again.
        if not self.field or f"{self.field}: " in self.message:
            return self.message
        return f"{self.field}: {self.message}"


class SpecError(HPOError, ValueError):
    """A job spec or search space is invalid (422); ``errors`` lists every problem found."""

    status_code = 422
    title = "Invalid job spec"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.errors = errors or [{"field": field or "", "message": message}]


class DatasetError(HPOError, ValueError):
    """A dataset cannot be loaded or fails validation (400 for uploads, 422 in a spec)."""

    status_code = 400
    title = "Invalid dataset"


class NotFoundError(HPOError, KeyError):
    """An id that does not exist, or belongs to another owner (404)."""

    status_code = 404
    title = "Not found"

    def __str__(self) -> str:  # KeyError would repr() the message
        return HPOError.__str__(self)


class InvalidTransitionError(HPOError, RuntimeError):
    """A job state change that the state machine does not allow (409)."""

    status_code = 409
    title = "Conflict"


class ConflictError(HPOError, RuntimeError):
    """A request that conflicts with current state, e.g. a reused idempotency key (409)."""

    status_code = 409
    title = "Conflict"


class LimitExceededError(HPOError, ValueError):
    """A configured limit was exceeded (422 by default; uploads use 413)."""

    status_code = 422
    title = "Limit exceeded"


class PayloadTooLargeError(LimitExceededError):
    status_code = 413
    title = "Payload too large"


class TooManyJobsError(HPOError, RuntimeError):
    """The owner already has the maximum number of active jobs (429 + Retry-After)."""

    status_code = 429
    title = "Too many active jobs"

    def __init__(self, message: str, *, retry_after: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class AuthError(HPOError, PermissionError):
    """Missing or invalid bearer token (401)."""

    status_code = 401
    title = "Unauthorized"


class StorageUnavailableError(HPOError, ConnectionError):
    """The database cannot be reached right now (503)."""

    status_code = 503
    title = "Database unavailable"


class TrialDivergedError(HPOError, ArithmeticError):
    """A trial's loss became NaN or inf; the trial is failed with this reason."""


__all__ = [
    "AuthError",
    "ConflictError",
    "DatasetError",
    "HPOError",
    "InvalidTransitionError",
    "LimitExceededError",
    "NotFoundError",
    "PayloadTooLargeError",
    "SpecError",
    "StorageUnavailableError",
    "TooManyJobsError",
    "TrialDivergedError",
]
