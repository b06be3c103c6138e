"""The application factory: settings in, a configured FastAPI app out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service.api.metrics import Metrics
from service.api.problems import install_problem_handlers
from service.api.routes import datasets, health, jobs, search_spaces
from service.config import Settings
from service.db import JobStore, create_schema, make_engine
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
        yield
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
    )
    install_problem_handlers(app)

    @app.middleware("http")
    async def _latency(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.request_latency.labels(request.method, path, str(response.status_code)).observe(
                time.perf_counter() - start
            )
        return response

    for r in (health.router, jobs.router, search_spaces.router, datasets.router):
        app.include_router(r)
    return app
