"""/healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import OwnerDep
from service.api.schemas import Health
from service.db import reader

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive (no database access)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request) -> Response:
    """The database is reachable."""
    try:
        with reader(request.app.state.engine).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        return JSONResponse(
            {"status": "unavailable", "detail": f"database unreachable: {type(e).__name__}"},
            status_code=503,
        )
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response)
def metrics(request: Request, _owner: OwnerDep) -> Response:
    """Prometheus text: jobs by state, trials finished, trial durations, request latency."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
