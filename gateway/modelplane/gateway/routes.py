"""The HTTP endpoints: each translates its body into one gRPC call and the answer back."""

from __future__ import annotations

import base64

import numpy as np
import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelplane.common.v1 import model_pb2
from modelplane.gateway import schemas
from modelplane.gateway.backends import Backends
from modelplane.inference.v1 import inference_service_pb2 as inference_pb
from modelplane.registry.v1 import registry_service_pb2 as registry_pb

api = APIRouter()
probes = APIRouter()

_LISTED_STATES = [
    s
    for s in model_pb2.ModelState.values()
    if s not in (model_pb2.MODEL_STATE_UNSPECIFIED, model_pb2.MODEL_STATE_FAILED)
]
_TASKS = {
    model_pb2.TASK_EMBEDDING: "embedding",
    model_pb2.TASK_RERANK: "rerank",
    model_pb2.TASK_GENERATION: "generation",
}


def backends(request: Request) -> Backends:
    return request.app.state.backends


def _embed_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[inference_pb.EmbedInput]:
    if isinstance(value, str):
        return [inference_pb.EmbedInput(text=value)]
    if value and all(isinstance(item, int) for item in value):
        return [inference_pb.EmbedInput(token_ids=inference_pb.TokenIds(ids=value))]
    return [
        inference_pb.EmbedInput(text=item)
        if isinstance(item, str)
        else inference_pb.EmbedInput(token_ids=inference_pb.TokenIds(ids=item))
        for item in value
    ]


@api.post(
    "/embeddings",
    response_model=schemas.EmbeddingsResponse,
    responses={
        400: {"model": schemas.ErrorBody},
        404: {"model": schemas.ErrorBody},
        409: {"model": schemas.ErrorBody},
        503: {"model": schemas.ErrorBody},
        504: {"model": schemas.ErrorBody},
    },
)
async def create_embeddings(body: schemas.EmbeddingsRequest, request: Request) -> schemas.EmbeddingsResponse:
    """Embeds texts with an embedding model; results are in input order."""
    structlog.contextvars.bind_contextvars(model=body.model)
    client = backends(request)
    response = await client.unary(
        "inference",
        client.inference.Embed,
        inference_pb.EmbedRequest(model=body.model, inputs=_embed_inputs(body.input)),
    )
    data = []
    for item in response.embeddings:
        vector: list[float] | str = list(item.values)
        if body.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(item.values, dtype="<f4").tobytes()).decode()
        data.append(schemas.EmbeddingData(index=item.index, embedding=vector))
    usage = schemas.EmbeddingsUsage(
        prompt_tokens=response.usage.prompt_tokens, total_tokens=response.usage.total_tokens
    )
    return schemas.EmbeddingsResponse(data=data, model=response.model, usage=usage)


@api.get("/models", response_model=schemas.ModelList)
async def list_models(request: Request) -> schemas.ModelList:
    """Models that are ready, or that a request loads on demand."""
    client = backends(request)
    cards: list[schemas.ModelCard] = []
    token = ""
    while True:
        page = await client.unary(
            "registry",
            client.registry.ListModels,
            registry_pb.ListModelsRequest(states=_LISTED_STATES, page_size=1000, page_token=token),
        )
        cards.extend(
            schemas.ModelCard(
                id=m.spec.name,
                created=m.create_time.seconds,
                task=_TASKS.get(m.spec.task, "unknown"),
                state=model_pb2.ModelState.Name(m.status.state).removeprefix("MODEL_STATE_"),
            )
            for m in page.models
        )
        token = page.next_page_token
        if not token:
            return schemas.ModelList(data=cards)


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the inference service and the registry answer their health checks."""
    status = await backends(request).health()
    ready = all(status.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "backends": status}, status_code=200 if ready else 503
    )


@probes.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics of the gateway process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
