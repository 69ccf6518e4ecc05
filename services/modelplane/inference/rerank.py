"""Rerank: documents scored against a query, most relevant first, every score in [0, 1].

Two kinds of model serve it, and the model's task says which:

- a cross-encoder (`Task.RERANK`, `RerankScoring.CROSS_ENCODER`): each (query, document) pair goes
  through the model at once, and the score is the sigmoid of its logit (the softmax probability
  of the last class when the model has several);
- an embedding model (`Task.EMBEDDING`): query and documents are embedded separately, and the score
  is their cosine similarity mapped from [-1, 1] to [0, 1].

The encoder itself runs through the handler's `run_encoder`, the same path embeddings take.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from modelplane.common.types import RerankScoring, Task, Usage
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InputTooLong, InvalidRequest
from modelplane.inference.tokenization import EncodedBatch, EncoderTokenizer

Sequences = list[tuple[list[int], list[int]]]
RunEncoder = Callable[[ServingModel, Sequences], Awaitable[tuple[np.ndarray, EncodedBatch]]]


@dataclass(frozen=True)
class RerankedDocument:
    index: int
    relevance_score: float
    document: str | None


@dataclass(frozen=True)
class RerankResult:
    model: str
    results: list[RerankedDocument]
    usage: Usage


def scoring_of(serving: ServingModel) -> RerankScoring:
    """An embedding model can only be compared by cosine; a rerank model follows its profile."""
    if serving.model.spec.task == Task.EMBEDDING:
        return RerankScoring.EMBEDDING_COSINE
    return serving.profile.rerank_scoring or RerankScoring.CROSS_ENCODER


async def rerank(
    serving: ServingModel,
    query: str,
    documents: Sequence[str],
    *,
    top_n: int | None,
    return_documents: bool,
    truncate: bool,
    run_encoder: RunEncoder,
) -> RerankResult:
    if top_n is not None and top_n < 0:
        raise InvalidRequest(f"top_n is {top_n}; it must be 0 or more, or absent for every document.")
    tokenizer = serving.tokenizer
    if tokenizer is None:
        raise InvalidRequest(f"Model '{serving.name}' has no tokenizer, so it cannot score text.")
    if scoring_of(serving) == RerankScoring.CROSS_ENCODER:
        scores, tokens = await _cross_encoder_scores(serving, tokenizer, query, documents, truncate, run_encoder)
    else:
        scores, tokens = await _cosine_scores(serving, tokenizer, query, documents, truncate, run_encoder)
    order = sorted(range(len(documents)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    results = [
        RerankedDocument(index=i, relevance_score=float(scores[i]), document=documents[i] if return_documents else None)
        for i in order
    ]
    return RerankResult(model=serving.name, results=results, usage=Usage(prompt_tokens=tokens))


def _refuse_long(
    sequences: Sequences, texts: Sequence[str], tokenizer: EncoderTokenizer, model: str, what: str
) -> None:
    """With truncation off, the first document over the model's limit is refused by its position."""
    for index, (ids, _) in enumerate(sequences):
        if len(ids) > tokenizer.max_tokens:
            raise InputTooLong(
                f"Document {index}{what} has {tokenizer.length_of(len(ids), texts[index])}; model '{model}' accepts "
                "at most "
                f"{tokenizer.max_tokens}. Shorten it, or allow truncation.",
                metadata={"model": model, "index": str(index)},
            )


async def _cross_encoder_scores(
    serving: ServingModel,
    tokenizer: EncoderTokenizer,
    query: str,
    documents: Sequence[str],
    truncate: bool,
    run_encoder: RunEncoder,
) -> tuple[np.ndarray, int]:
    # Truncation cuts the end of each pair: the document's tail, never the query.
    sequences = [(e.ids, e.type_ids) for e in tokenizer.encode_pairs([(query, doc) for doc in documents])]
    if not truncate:
        _refuse_long(sequences, [query + doc for doc in documents], tokenizer, serving.name, " with the query")
    logits, facts = await run_encoder(serving, sequences)
    logits = logits.reshape(len(documents), -1).astype(np.float64)
    if logits.shape[1] == 1:
        scores = 1.0 / (1.0 + np.exp(-logits[:, 0]))
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = shifted[:, -1] / shifted.sum(axis=1)
    return scores, sum(facts.token_counts)


async def _cosine_scores(
    serving: ServingModel,
    tokenizer: EncoderTokenizer,
    query: str,
    documents: Sequence[str],
    truncate: bool,
    run_encoder: RunEncoder,
) -> tuple[np.ndarray, int]:
    sequences = [(e.ids, e.type_ids) for e in tokenizer.encode_texts([query, *documents])]
    if not truncate:
        if len(sequences[0][0]) > tokenizer.max_tokens:
            raise InputTooLong(
                f"The query has {tokenizer.length_of(len(sequences[0][0]), query)}; model '{serving.name}' accepts "
                "at most "
                f"{tokenizer.max_tokens}. Shorten it, or allow truncation.",
                metadata={"model": serving.name},
            )
        _refuse_long(sequences[1:], documents, tokenizer, serving.name, "")
    vectors, facts = await run_encoder(serving, sequences)
    vectors = vectors.astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = vectors[1:] @ vectors[0]
    return np.clip((cosine + 1.0) / 2.0, 0.0, 1.0), sum(facts.token_counts)
