"""Rerank end to end: HTTP → gateway → inference → the real Triton, for a cross-encoder built here
(checked against PyTorch) and for the bundled embedding model (checked against sentence-transformers)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import RunningStack

EMBEDDER = "all-minilm-l6-v2"
QUERY = "What is the capital of the United States?"
DOCUMENTS = [
    "Carson City is the capital city of the American state of Nevada.",
    "Washington, D.C. is the capital of the United States.",
    "Bananas are yellow and rich in potassium.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
    "Capital punishment has existed in the United States since before it was a country.",
    "Triton Inference Server loads models from a repository.",
    "The mitochondria is the powerhouse of the cell. " * 80,  # longer than the model's limit: truncated
]


@pytest.fixture(scope="module")
def cross_encoder_reference(cross_encoder_path: Path) -> np.ndarray:
    """PyTorch's scores for (QUERY, document): the sigmoid of the model's one logit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_path)
    batch = tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return torch.sigmoid(model(**batch).logits[:, 0]).numpy()


def _rerank(stack: RunningStack, body: dict, path: str = "/v1/rerank") -> httpx.Response:
    return httpx.post(f"{stack.gateway_url}{path}", json=body, timeout=120)


def test_cross_encoder_scores_match_pytorch(
    stack: RunningStack, cross_encoder: str, cross_encoder_reference: np.ndarray
) -> None:
    response = _rerank(stack, {"model": cross_encoder, "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    served = np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])
    np.testing.assert_allclose(served, cross_encoder_reference, atol=1e-4)
    assert [r["index"] for r in results] == list(np.argsort(-cross_encoder_reference, kind="stable"))
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[r["index"]] for r in results]
    assert body["model"] == cross_encoder
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(DOCUMENTS) * 10


def test_embedding_model_reranks_by_cosine(stack: RunningStack, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    query, *documents = model.encode([QUERY, *DOCUMENTS], normalize_embeddings=True)
    expected = (np.asarray(documents) @ query + 1) / 2

    response = _rerank(stack, {"model": EMBEDDER, "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    served = np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])
    np.testing.assert_allclose(served, expected, atol=1e-4)
    # A real embedding model knows which document answers the question.
    assert results[0]["index"] == 1
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)


def test_top_n_documents_as_objects_and_no_texts_back(stack: RunningStack, cross_encoder: str) -> None:
    full = _rerank(stack, {"model": cross_encoder, "query": QUERY, "documents": DOCUMENTS}).json()["results"]
    response = _rerank(
        stack,
        {
            "model": cross_encoder,
            "query": QUERY,
            "documents": [{"text": d} for d in DOCUMENTS],
            "top_n": 3,
            "return_documents": False,
        },
        path="/rerank",  # the bare path works as well as /v1
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in full[:3]]
    assert all("document" not in r for r in results)


def test_null_top_n_means_every_document(stack: RunningStack, cross_encoder: str) -> None:
    """Dify sends "top_n": null when the knowledge base sets none."""
    response = _rerank(stack, {"model": cross_encoder, "query": QUERY, "documents": DOCUMENTS[:3], "top_n": None})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


def test_rerank_model_refuses_embeddings_with_the_reason(stack: RunningStack, cross_encoder: str) -> None:
    response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": cross_encoder, "input": "x"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "wrong_task"
    assert f"Model '{cross_encoder}' serves rerank, not embedding" in error["message"]


def test_empty_documents_are_a_422_naming_the_field(stack: RunningStack) -> None:
    response = _rerank(stack, {"model": EMBEDDER, "query": QUERY, "documents": []})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "documents" and "at least 1 item" in error["message"]


def test_the_request_difys_marketplace_plugin_validates_with(stack: RunningStack, cross_encoder: str) -> None:
    """Dify's OpenAI-API-compatible plugin validates a rerank model with three documents, top_n=3 and,
    with no key configured, an empty Authorization header."""
    body = {"model": cross_encoder, "query": QUERY, "documents": DOCUMENTS[:3], "top_n": 3}
    response = httpx.post(f"{stack.gateway_url}/v1/rerank", json=body, headers={"Authorization": ""}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
    # It sends top_n=0 as it is; zero results is what was asked for.
    nothing = _rerank(stack, {**body, "top_n": 0})
    assert nothing.status_code == 200 and nothing.json()["results"] == []
