"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import structlog
from fastapi import APIRouter, Request, Response

from modelplane.gateway import schemas
from modelplane.gateway.backends import backends
from modelplane.gateway.limits import limits
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
    responses=schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503),
)
async def create_embeddings(body: schemas.EmbeddingsRequest, request: Request) -> Response:
    """Embeds texts with an embedding model; results are in input order."""
    structlog.contextvars.bind_contextvars(model=body.model)
    inputs = _embed_inputs(body.input)
    limit = limits(request)
    limit.check_batch(len(inputs), "input")
    client = backends(request)
    answers = await client.embed(
        body.model, inputs, size=limit.inference_batch_inputs, concurrency=limit.inference_concurrency
    )
    data = []
    prompt_tokens = 0
    for offset, answer in answers:
        prompt_tokens += answer.prompt_tokens
        for position, item in enumerate(answer.embeddings):
            vector: np.ndarray | str
            if body.encoding_format == "base64":
                vector = base64.b64encode(item.packed_values).decode()
            else:
                vector = np.frombuffer(item.packed_values, dtype="<f4")
            data.append({"object": "embedding", "index": offset + position, "embedding": vector})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    document = {"object": "list", "data": data, "model": answers[0][1].model, "usage": usage}
    # Not validated again as an EmbeddingsResponse (its vectors are hundreds of numbers each): orjson
    # writes each float32 in the fewest digits that read back as the same float32.
    return Response(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
