"""Embeddings end to end: HTTP → gateway → inference → the real Triton → the real MiniLM."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningStack

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A bank in Frankfurt serves its own language models on premise.",
    "Hospitals keep patient records inside their own network.",
    "How do I reset my password?",
    "Triton Inference Server loads models from a repository.",
    "SELECT name FROM models WHERE state = 'READY';",
    "Das Wetter in Berlin ist heute sonnig.",
    "Le modèle est chargé en mémoire.",
    "東京は日本の首都です。",
    "emoji 🚀🔥 and symbols ∑∫√ in one line",
    "a",
    "OK",
    "   leading and trailing spaces   ",
    "UPPER CASE SHOUTING ABOUT THROUGHPUT",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 42.",
    "The factory's sensor reported a temperature of 87 °C at 14:32.",
    "Retrieval-augmented generation needs fast, accurate embeddings.",
    "line one\nline two\ttabbed",
    "https://example.internal/docs/models?id=7#section",
    "The mitochondria is the powerhouse of the cell. " * 30,  # longer than the model's 256-token limit
    "Short.",
    "Why is the sky blue during the day and red at sunset?",
]


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> np.ndarray:
    model = SentenceTransformer(str(minilm_path), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=False)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_match_sentence_transformers(stack: RunningStack, reference: np.ndarray) -> None:
    response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": SENTENCES}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == list(range(len(SENTENCES)))
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert vectors.shape == (len(SENTENCES), 384)
    cosine = _cosine(vectors, reference)
    assert cosine.min() >= 0.999, dict(zip(SENTENCES, cosine.round(5), strict=True))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(SENTENCES)


def test_the_readme_curl_works_as_typed(stack: RunningStack) -> None:
    """curl -d sends a form content type; the gateway reads every body as JSON."""
    result = subprocess.run(
        ["curl", "-s", f"{stack.gateway_url}/v1/embeddings", "-d", f'{{"model":"{MODEL}","input":["a","b"]}}'],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    import json

    body = json.loads(result.stdout)
    assert len(body["data"]) == 2 and len(body["data"][0]["embedding"]) == 384


def test_single_string_and_base64(stack: RunningStack, reference: np.ndarray) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/embeddings",  # the bare path works as well as /v1
        json={"model": MODEL, "input": SENTENCES[0], "encoding_format": "base64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    assert _cosine(vector[None, :], reference[:1])[0] >= 0.999


def test_float_and_base64_answers_carry_the_same_float32_numbers(stack: RunningStack) -> None:
    def embed(encoding_format: str) -> list:
        body = {"model": MODEL, "input": SENTENCES[:6], "encoding_format": encoding_format}
        response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [item["embedding"] for item in response.json()["data"]]

    as_floats = np.array(embed("float"), dtype=np.float32)
    as_base64 = np.array([np.frombuffer(base64.b64decode(text), dtype="<f4") for text in embed("base64")])
    np.testing.assert_array_equal(as_floats, as_base64)


def test_the_inference_service_answers_packed_vectors_as_asked(stack: RunningStack) -> None:
    """VECTOR_ENCODING_PACKED_FLOAT32 (what the gateway asks for) carries the same numbers as the
    default, one float per number, that other gRPC clients read."""
    inputs = [pb.EmbedInput(text=text) for text in SENTENCES[:4]]
    with grpc.insecure_channel(stack.inference) as channel:
        embed = pb_grpc.InferenceServiceStub(channel).Embed
        floats = embed(pb.EmbedRequest(model=MODEL, inputs=inputs), timeout=60)
        packed = embed(
            pb.EmbedRequest(model=MODEL, inputs=inputs, vector_encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32), timeout=60
        )
    for by_float, by_bytes in zip(floats.embeddings, packed.embeddings, strict=True):
        assert len(by_float.values) == 384 and not by_float.packed_values
        assert len(by_bytes.packed_values) == 4 * 384 and not by_bytes.values
        np.testing.assert_array_equal(
            np.array(by_float.values, dtype=np.float32), np.frombuffer(by_bytes.packed_values, "<f4")
        )
        assert (by_float.num_tokens, by_float.truncated) == (by_bytes.num_tokens, by_bytes.truncated)


def test_token_id_input_equals_text_input(stack: RunningStack, minilm_path: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_path)(SENTENCES[1], add_special_tokens=False)["input_ids"]
    by_ids = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": ids}, timeout=60).json()
    by_text = httpx.post(
        f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": SENTENCES[1]}, timeout=60
    ).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)


def test_models_lists_the_bundled_model(stack: RunningStack) -> None:
    body = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()
    cards = {card["id"]: card for card in body["data"]}
    assert cards[MODEL]["task"] == "embedding" and cards[MODEL]["state"] == "READY"


def test_unknown_model_is_a_404_that_says_what_to_do(stack: RunningStack) -> None:
    response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "Model 'nope' is not registered" in error["message"] and "/v1/models" in error["message"]
    assert response.headers["x-request-id"]


def test_malformed_body_is_refused_with_the_field(stack: RunningStack) -> None:
    response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"input": "x"}, timeout=10)
    assert response.status_code == 422
    assert "model" in response.json()["error"]["message"]


def test_a_huge_text_is_embedded_as_its_first_tokens_are(stack: RunningStack) -> None:
    """A multi-megabyte input is tokenised only as far as the model's 256 tokens need, and its
    embedding is exactly that of a text holding those tokens (tokenised whole, as every text was)."""
    sentence = "Retrieval-augmented generation needs fast, accurate embeddings of every chunk. "
    huge = sentence * 40_000  # 3.2 MB
    head = sentence * 40  # 3,200 characters: over 256 tokens, under the length tokenised whole
    response = httpx.post(
        f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": [huge, head]}, timeout=120
    )
    assert response.status_code == 200, response.text
    body = response.json()
    vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(vectors[0], vectors[1])
    assert body["usage"]["prompt_tokens"] == 2 * 256
