"""The application factory: settings in, a configured FastAPI app out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.commit_signal import CommitSignal
from service.api.limits import BodyLimitMiddleware
from service.api.metrics import Metrics
from service.api.problems import PROBLEM, install_problem_handlers
from service.api.routes import datasets, health, jobs, search_spaces
from service.api.schemas import problem_responses
from service.api.security import BearerAuthMiddleware
from service.config import Settings
from service.db import JobStore, create_schema, make_engine
from service.startup import freeze_startup_objects
from service.studies import make_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.resolved_database_url
        engine = make_engine(url)
        create_schema(engine)
        app.state.settings = settings
        app.state.engine = engine
        app.state.jobs = JobStore(engine)
        app.state.storage = make_storage(url, settings)
        app.state.metrics = Metrics(engine, app.state.jobs)
        app.state.commits = CommitSignal(engine)  # wakes long polls (GET /jobs/{id})
        app.state.commits.start()
        freeze_startup_objects()  # full collections would stall requests (see there)
        yield
        await app.state.commits.stop()
        engine.dispose()

    app = FastAPI(
        title="HPO service",
        version="0.1.0",
        description=(
            "Hyperparameter search for PyTorch MLPs. Submit a job (dataset, architecture, search "
            "space, sampler, budget); workers run its trials with Optuna. Errors are RFC 9457 problem "
            "details. With HPO_API_TOKENS set, send `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
        # Every operation may answer these as problem details (documented for clients/fuzzers).
        responses=problem_responses(400, 401, 404, 409, 413, 422, 429, 503),
    )
    install_problem_handlers(app)
    _document_problems(app)

    for r in (health.router, jobs.router, search_spaces.router, datasets.router):
        app.include_router(r)
    # Pure ASGI middlewares (no BaseHTTPMiddleware: its task group would wrap the body limit's
    # 413 in an ExceptionGroup, which FastAPI then answers as a 400). Added last = outermost:
    # a request without a valid token is refused before its body is read.
    app.add_middleware(LatencyMiddleware)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(BearerAuthMiddleware, settings=settings)
    return app


class LatencyMiddleware:
    """Request latency by method, route template and status (Prometheus histogram)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                metrics.request_latency.labels(scope["method"], path, str(status)).observe(
                    time.perf_counter() - start
                )


def _document_problems(app: FastAPI) -> None:
    """Error answers are ``application/problem+json``; FastAPI documents additional responses
    under the route's media type (JSON, or HTML for the report, or a file for the model
    download), so move them there (the schema is the same Problem model)."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                for code, resp in op.get("responses", {}).items():
                    for body in resp.get("content", {}).values():
                        ref = body.get("schema", {}).get("$ref", "")
                        if code[0] in "45" and ref.endswith("/Problem"):
                            resp["content"] = {PROBLEM: body}
                            break
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
