"""Protobuf ⇄ domain conversion for the inference service's messages."""

from __future__ import annotations

from modelplane.common.types import Usage
from modelplane.common.v1 import usage_pb2
from modelplane.inference.handlers import EmbedInput, EmbedResult
from modelplane.inference.rerank import RerankResult
from modelplane.inference.v1 import inference_service_pb2 as pb


def embed_inputs_from_proto(request: pb.EmbedRequest) -> list[EmbedInput]:
    return [
        EmbedInput(token_ids=tuple(item.token_ids.ids))
        if item.WhichOneof("content") == "token_ids"
        else EmbedInput(text=item.text)
        for item in request.inputs
    ]


def usage_to_proto(usage: Usage) -> usage_pb2.Usage:
    return usage_pb2.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def embed_result_to_proto(result: EmbedResult) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        model=result.model,
        embeddings=[
            pb.Embedding(index=e.index, values=e.values.tolist(), num_tokens=e.num_tokens, truncated=e.truncated)
            for e in result.embeddings
        ],
        usage=usage_to_proto(result.usage),
    )


def rerank_result_to_proto(result: RerankResult) -> pb.RerankResponse:
    return pb.RerankResponse(
        model=result.model,
        results=[
            pb.RerankResult(index=r.index, relevance_score=r.relevance_score, document=r.document or "")
            for r in result.results
        ],
        usage=usage_to_proto(result.usage),
    )
