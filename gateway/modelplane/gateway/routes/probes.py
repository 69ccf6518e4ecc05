"""Probes and metrics: /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelplane.gateway.backends import backends

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the inference service and the registry answer their health checks."""
    status = await backends(request).health()
    ready = all(status.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "backends": status}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics of the gateway process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
