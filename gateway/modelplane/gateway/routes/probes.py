"""Probes and metrics: /healthz, /readyz, /metrics.

- `/healthz` is liveness: the gateway process answers. A liveness probe must use it, never
  `/readyz`, or a gateway would be restarted while a model loads.
- `/readyz` is readiness of the node's service: the inference service and the registry answer, and
  every model the node must serve (desired state LOADED: loaded by an operator, a request or the
  bundled models) is READY. The body names each model that is not and what it is doing. Checks are
  named as in Kubernetes' own `/readyz`: `?exclude=models` leaves the models out (what the gateway
  of a Helm release uses: a model that loads or failed is answered per request with 503 or 409,
  and taking every gateway out of its Service would refuse every model's clients instead).
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelplane.common.v1 import model_pb2
from modelplane.gateway import errors
from modelplane.gateway.backends import Backends, backends
from modelplane.registry.v1 import registry_service_pb2 as registry_pb

router = APIRouter()

READINESS_CHECKS = ("inference", "registry", "models")
_PROBE_TIMEOUT_SECONDS = 2.0
_PAGE = 1000
_EXCLUDE = f"Checks to leave out: {', '.join(READINESS_CHECKS)}."


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(
    request: Request,
    exclude: Annotated[list[str] | None, Query(description=_EXCLUDE)] = None,
) -> JSONResponse:
    """Readiness: the backends answer and every model this node must serve is READY."""
    skipped = set(exclude or ())
    unknown = sorted(skipped - set(READINESS_CHECKS))
    if unknown:
        raise errors.BadRequest(
            f"Unknown readiness check {unknown[0]!r} in exclude; the checks are {', '.join(READINESS_CHECKS)}.",
            param="exclude",
        )
    client = backends(request)
    status = {name: up for name, up in (await client.health()).items() if name not in skipped}
    body: dict[str, Any] = {"backends": status}
    ready = all(status.values())
    if "models" not in skipped:
        models = await _models_not_ready(client)
        body["models"] = models
        ready = ready and models.get("not_ready") == []
    body = {"status": "ready" if ready else "not ready", **body}
    return JSONResponse(body, status_code=200 if ready else 503)


async def _models_not_ready(client: Backends) -> dict[str, Any]:
    """The models desired LOADED, and what each that is not READY is doing."""
    wanted: list[model_pb2.Model] = []
    token = ""
    try:
        while True:
            page = await client.registry.ListModels(
                registry_pb.ListModelsRequest(page_size=_PAGE, page_token=token), timeout=_PROBE_TIMEOUT_SECONDS
            )
            wanted.extend(m for m in page.models if m.desired_state == model_pb2.DESIRED_STATE_LOADED)
            token = page.next_page_token
            if not token:
                break
    except grpc.aio.AioRpcError:
        return {"error": "the registry did not answer, so which models are ready is unknown"}
    not_ready = [_doing(m) for m in wanted if m.status.state != model_pb2.MODEL_STATE_READY]
    return {"wanted": len(wanted), "ready": len(wanted) - len(not_ready), "not_ready": not_ready}


def _doing(model: model_pb2.Model) -> dict[str, Any]:
    """What a model is doing, in numbers: no reasons or sources, which may name internals (the
    probe answers without an API key). `modelplane models events NAME` tells an operator why."""
    state = model_pb2.ModelState.Name(model.status.state).removeprefix("MODEL_STATE_")
    doing: dict[str, Any] = {"model": model.spec.name, "state": state}
    progress = model.status.progress
    if model.status.HasField("progress") and (progress.bytes_total or progress.files_total):
        doing["progress"] = {
            "bytes_done": progress.bytes_done,
            "bytes_total": progress.bytes_total,
            "files_done": progress.files_done,
            "files_total": progress.files_total,
        }
    if state == "FAILED":
        doing["why"] = f"modelplane models events {model.spec.name}"
    if model.status.HasField("update_time"):
        doing["since"] = model.status.update_time.ToJsonString()
    return doing


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics of the gateway process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
