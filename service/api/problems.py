"""RFC 9457 problem details for every error, mapped from the project's exceptions in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db.retry import describe, is_transient
from service.errors import HPOError, SpecError, TooManyJobsError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _field_and_message(loc: tuple[Any, ...] | list[Any], msg: str) -> tuple[str, str]:
    from service.spec import error_location

    parts, msg = error_location(
        [p for p in loc if p not in ("body", "query", "path", "header")], msg
    )
    return ".".join(parts) or "body", msg


def _unavailable(request: Request, detail: str) -> JSONResponse:
    """503 with Retry-After: the database is away; clients should retry, nothing was lost."""
    return problem(
        503, "Database unavailable", detail, instance=request.url.path, headers={"Retry-After": "5"}
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(HPOError)
    async def _hpo(request: Request, exc: HPOError) -> JSONResponse:
        headers = (
            {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyJobsError) else None
        )
        if exc.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        errors = exc.errors if isinstance(exc, SpecError) else None
        return problem(
            exc.status_code,
            exc.title,
            str(exc),
            instance=request.url.path,
            headers=headers,
            field=exc.field,
            errors=errors,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            if e.get("type") == "extra_forbidden":
                msg = "unknown field (not part of the job spec)"
            if e.get("type") == "json_invalid":  # loc is ("body", <character offset>)
                loc = e.get("loc", ())
                at = f" at character {loc[-1]}" if len(loc) > 1 else ""
                reason = (e.get("ctx") or {}).get("error", "")
                errors.append({"field": "body", "message": f"not valid JSON{at}: {reason}"})
                continue
            field, msg = _field_and_message(e.get("loc", ()), msg)
            errors.append({"field": field, "message": msg})
        detail = "; ".join(f"{x['field']}: {x['message']}" for x in errors) or "invalid request"
        return problem(
            422,
            "Invalid request",
            detail,
            instance=request.url.path,
            field=errors[0]["field"] if errors else None,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code,
            _title(exc.status_code),
            str(exc.detail),
            instance=request.url.path,
            headers=dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return _unavailable(request, "the database cannot be reached right now; retry shortly")

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or is_transient(exc):
            return _unavailable(request, "the database connection was lost; retry shortly")
        log.exception("database error")
        return problem(
            500, "Internal error", "a database error occurred", instance=request.url.path
        )

    @app.exception_handler(StorageInternalError)
    async def _optuna_storage(request: Request, exc: StorageInternalError) -> JSONResponse:
        # Optuna wraps every SQLAlchemy error of its storage; a dropped or refused connection
        # is the database being away (503), anything else is a bug (500, logged).
        return await _unhandled(request, exc)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        if is_transient(exc):  # e.g. Optuna's StorageInternalError wrapping a dropped connection
            log.warning("database unavailable: %s", describe(exc))
            return _unavailable(request, "the database cannot be reached right now; retry shortly")
        log.exception("unhandled error on %s", request.url.path)
        return problem(
            500,
            "Internal error",
            "an unexpected error occurred; it has been logged",
            instance=request.url.path,
        )


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
