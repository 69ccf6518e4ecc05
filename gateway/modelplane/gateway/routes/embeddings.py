"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
import structlog
from fastapi import APIRouter, Request

from modelplane.gateway import schemas
from modelplane.gateway.backends import backends
from modelplane.inference.v1 import inference_service_pb2 as inference_pb

router = APIRouter()


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


@router.post(
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
