"""RFC 9457 problem details for every error, mapped from the project's exceptions in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    from service.spec import _is_union_tag

    parts = [
        str(p) for p in loc if p not in ("body", "query", "path", "header") and not _is_union_tag(p)
    ]
    return ".".join(parts) or "body"


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
            errors.append({"field": _loc_to_field(e.get("loc", ())), "message": msg})
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
        return problem(
            503,
            "Database unavailable",
            "the database cannot be reached right now; retry shortly",
            instance=request.url.path,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return problem(
                503,
                "Database unavailable",
                "the database connection was lost; retry shortly",
                instance=request.url.path,
                headers={"Retry-After": "5"},
            )
        log.exception("database error")
        return problem(
            500, "Internal error", "a database error occurred", instance=request.url.path
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
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
