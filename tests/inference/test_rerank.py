"""Rerank scoring, ordering, top_n and truncation, with the model's real tokenizer and a stand-in
for Triton (the encoder's outputs are made up here; the integration tests run the real ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelplane.common.types import Model, ModelSpec, ModelStatus, RerankScoring, ServingProfile, Task
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InputTooLong, InvalidRequest
from modelplane.inference.rerank import rerank
from modelplane.inference.tokenization import EncodedBatch, EncoderTokenizer

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path: Path) -> EncoderTokenizer:
    return EncoderTokenizer((minilm_path / "tokenizer.json").read_bytes(), max_tokens=32, pad_token="[PAD]")


def _serving(tokenizer: EncoderTokenizer, task: Task, scoring: RerankScoring = RerankScoring.UNSPECIFIED):
    profile = ServingProfile(triton_model_name="m", input_names=NAMES, max_input_tokens=32, rerank_scoring=scoring)
    model = Model(spec=ModelSpec(name="m", task=task), status=ModelStatus(profile=profile))
    return ServingModel(model, profile, tokenizer)


def _encoder(outputs: np.ndarray, seen: list | None = None):
    """Triton's stand-in: returns `outputs` for the batch, after the tokenizer's real batching."""

    async def run(serving: ServingModel, sequences: list) -> tuple[np.ndarray, EncodedBatch]:
        batch = serving.tokenizer.batch(sequences, NAMES)
        if seen is not None:
            seen.append(batch)
        return outputs, batch

    return run


async def test_cross_encoder_sigmoid_sorted_best_first(tokenizer: EncoderTokenizer) -> None:
    logits = np.array([[0.0], [2.0], [-1.0]], dtype=np.float32)
    seen: list[EncodedBatch] = []
    result = await rerank(
        _serving(tokenizer, Task.RERANK),
        "query",
        ["a", "b", "c"],
        top_n=None,
        return_documents=True,
        truncate=True,
        run_encoder=_encoder(logits, seen),
    )
    assert [r.index for r in result.results] == [1, 0, 2]
    np.testing.assert_allclose([r.relevance_score for r in result.results], 1 / (1 + np.exp(-np.array([2, 0, -1]))))
    assert [r.document for r in result.results] == ["b", "a", "c"]
    # Pairs: [CLS] query [SEP] doc [SEP], the document's tokens typed 1; usage counts every pair's tokens.
    ids = seen[0].arrays["input_ids"][0].tolist()
    assert ids == tokenizer.tokenizer.encode("query", "a").ids
    assert seen[0].arrays["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1]
    assert result.usage.prompt_tokens == 15


async def test_top_n_and_no_documents(tokenizer: EncoderTokenizer) -> None:
    logits = np.array([[0.1], [0.3], [0.2]], dtype=np.float32)
    serving = _serving(tokenizer, Task.RERANK)
    kwargs = {"return_documents": False, "truncate": True, "run_encoder": _encoder(logits)}
    top = await rerank(serving, "q", ["a", "b", "c"], top_n=2, **kwargs)
    assert [(r.index, r.document) for r in top.results] == [(1, None), (2, None)]
    assert (await rerank(serving, "q", ["a", "b", "c"], top_n=0, **kwargs)).results == []
    with pytest.raises(InvalidRequest, match="top_n is -1"):
        await rerank(serving, "q", ["a"], top_n=-1, **kwargs)


async def test_several_labels_score_the_last_by_softmax(tokenizer: EncoderTokenizer) -> None:
    logits = np.array([[2.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    result = await rerank(
        _serving(tokenizer, Task.RERANK),
        "q",
        ["a", "b"],
        top_n=None,
        return_documents=False,
        truncate=True,
        run_encoder=_encoder(logits),
    )
    expected = np.exp(2) / (1 + np.exp(2))
    assert [(r.index, round(r.relevance_score, 6)) for r in result.results] == [
        (1, round(expected, 6)),
        (0, round(1 - expected, 6)),
    ]


async def test_embedding_model_scores_by_cosine_in_unit_range(tokenizer: EncoderTokenizer) -> None:
    vectors = np.array([[2, 0], [1, 0], [0, 3], [-1, 0]], dtype=np.float32)  # query, then 3 documents
    # An embedding model is compared by cosine whatever its profile says.
    serving = _serving(tokenizer, Task.EMBEDDING, RerankScoring.CROSS_ENCODER)
    result = await rerank(
        serving,
        "q",
        ["same", "orthogonal", "opposite"],
        top_n=None,
        return_documents=False,
        truncate=True,
        run_encoder=_encoder(vectors),
    )
    assert [(r.index, r.relevance_score) for r in result.results] == [(0, 1.0), (1, 0.5), (2, 0.0)]
    assert result.usage.prompt_tokens == 3 + 3 + 3 + 3


async def test_without_truncation_a_long_pair_is_refused_by_position(tokenizer: EncoderTokenizer) -> None:
    long = "word " * 40
    with pytest.raises(InputTooLong) as refused:
        await rerank(
            _serving(tokenizer, Task.RERANK),
            "q",
            ["short", long],
            top_n=None,
            return_documents=False,
            truncate=False,
            run_encoder=_encoder(np.zeros((2, 1))),
        )
    assert refused.value.message.startswith("Document 1 with the query has 44 tokens; model 'm' accepts at most 32.")
    assert refused.value.metadata["index"] == "1"
    with pytest.raises(InputTooLong, match="The query has"):
        await rerank(
            _serving(tokenizer, Task.EMBEDDING),
            long,
            ["short"],
            top_n=None,
            return_documents=False,
            truncate=False,
            run_encoder=_encoder(np.zeros((2, 2))),
        )
