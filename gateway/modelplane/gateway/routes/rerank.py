"""POST /v1/rerank: Jina's and Cohere's rerank API, as Dify's OpenAI-API-compatible provider calls it."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from fastapi import APIRouter, Request

from modelplane.common.request_context import current_request_id
from modelplane.gateway import schemas
from modelplane.gateway.backends import backends
from modelplane.gateway.limits import limits
from modelplane.inference.v1 import inference_service_pb2 as inference_pb

router = APIRouter()


@router.post(
    "/rerank",
    response_model=schemas.RerankResponse,
    response_model_exclude_none=True,
    responses=schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503),
)
async def rerank(body: schemas.RerankRequest, request: Request) -> schemas.RerankResponse:
    """Scores documents against a query with a cross-encoder (the sigmoid of its logit) or an
    embedding model (cosine similarity mapped to [0, 1]), most relevant first."""
    structlog.contextvars.bind_contextvars(model=body.model)
    documents = [doc if isinstance(doc, str) else doc.text for doc in body.documents]
    limit = limits(request)
    limit.check_batch(len(documents), "documents")
    client = backends(request)

    def rerank_request(chunk: Sequence[str]) -> inference_pb.RerankRequest:
        # Every slice is scored whole; top_n applies to the joined results.
        return inference_pb.RerankRequest(model=body.model, query=body.query, documents=chunk, return_documents=False)

    answers = await client.unary_split(
        "inference",
        client.inference.Rerank,
        documents,
        rerank_request,
        size=limit.inference_batch_inputs,
        concurrency=limit.inference_concurrency,
    )
    scored = [(offset + r.index, r.relevance_score) for offset, answer in answers for r in answer.results]
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    if body.top_n is not None:
        scored = scored[: body.top_n]
    results = [
        schemas.RerankResult(
            index=index,
            relevance_score=score,
            document=schemas.RerankResultDocument(text=documents[index]) if body.return_documents else None,
        )
        for index, score in scored
    ]
    prompt_tokens = sum(answer.usage.prompt_tokens for _, answer in answers)
    return schemas.RerankResponse(
        id=current_request_id.get(),
        model=answers[0][1].model,
        results=results,
        usage=schemas.RerankUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )
