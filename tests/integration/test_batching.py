"""Cross-request batching through the real stack: a text's embedding does not depend on what it
was batched with, and concurrent requests really are batched (Triton's and the inference
service's own metrics say so)."""

from __future__ import annotations

import asyncio
import random
import re

import httpx
import numpy as np

from tests.integration.conftest import RunningStack

MODEL = "all-minilm-l6-v2"
# From one token to past the model's 256-token limit, so they fall in every length bucket.
TEXTS = [
    "a",
    "OK",
    "How do I reset my password?",
    "東京は日本の首都です。",
    "The factory's sensor reported a temperature of 87 °C at 14:32 and the operator stopped line three.",
    "Retrieval-augmented generation needs fast, accurate embeddings; " * 4,
    "Triton Inference Server loads models from a repository and batches requests dynamically. " * 6,
    "The mitochondria is the powerhouse of the cell. " * 30,  # cut to 256 tokens
]
TOLERANCE = 1e-6  # float32 sums over differently padded shapes; observed differences are below 1e-7


def _vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])])


def _alone(stack: RunningStack) -> tuple[np.ndarray, list[int]]:
    """Each text in a request of its own, one request at a time: nothing to batch with. Returns
    the embeddings and each request's prompt tokens."""
    rows, tokens = [], []
    for text in TEXTS:
        response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": [text]}, timeout=60)
        assert response.status_code == 200, response.text
        rows.append(_vectors(response.json())[0])
        tokens.append(response.json()["usage"]["prompt_tokens"])
    return np.stack(rows), tokens


def _triton_metrics(stack: RunningStack) -> dict[str, float]:
    text = httpx.get(stack.triton_metrics_url, timeout=10).text
    values = {}
    for name in ("request_success", "exec_count", "queue_summary_us_count", "queue_summary_us_sum"):
        found = re.search(rf'^nv_inference_{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values


def _coalescing_metrics(stack: RunningStack) -> dict[str, float]:
    """The gateway's coalescing of Embed calls and the inference service's of Triton calls."""
    values = {}
    for process, prefix in (("gateway", "gateway_embed"), ("inference", "inference_encoder")):
        text = httpx.get(stack.metrics[process], timeout=10).text
        for name in ("calls_total", "items_total", "wait_seconds_count"):
            found = re.search(rf'^modelplane_{prefix}_{name}{{model="{MODEL}"}} (\S+)$', text, re.M)
            values[f"{process}_{name}"] = float(found.group(1)) if found else 0.0
    return values


async def _concurrently(stack: RunningStack, order: list[int]) -> list[tuple[np.ndarray, int]]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120) as client:

        async def one(index: int) -> tuple[np.ndarray, int]:
            response = await client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[index]})
            assert response.status_code == 200, response.text
            return _vectors(response.json())[0], response.json()["usage"]["prompt_tokens"]

        return await asyncio.gather(*(one(index) for index in order))


async def test_concurrent_requests_are_batched_and_each_text_gets_its_own_embedding(stack: RunningStack) -> None:
    alone, alone_tokens = _alone(stack)
    before, coalescing_before = _triton_metrics(stack), _coalescing_metrics(stack)
    order = [index for index in range(len(TEXTS)) for _ in range(6)]
    random.Random(7).shuffle(order)
    together = await _concurrently(stack, order)
    after, coalescing_after = _triton_metrics(stack), _coalescing_metrics(stack)

    for index, (vector, tokens) in zip(order, together, strict=True):
        np.testing.assert_allclose(vector, alone[index], atol=TOLERANCE, err_msg=f"text {index}: {TEXTS[index][:40]}")
        assert tokens == alone_tokens[index], f"text {index}: a shared call changed the request's usage"

    def grew(values_before: dict[str, float], values_after: dict[str, float], name: str) -> float:
        return values_after[name] - values_before[name]

    # The gateway sent each request's texts once, some of them in a shared call, and measured each
    # one's wait for a call slot; the inference service sent each of its calls' texts to Triton
    # once, again sharing calls where they arrived together.
    gateway_calls = grew(coalescing_before, coalescing_after, "gateway_calls_total")
    assert grew(coalescing_before, coalescing_after, "gateway_items_total") == len(order)
    assert grew(coalescing_before, coalescing_after, "gateway_wait_seconds_count") == len(order)
    assert grew(coalescing_before, coalescing_after, "inference_items_total") == gateway_calls
    calls = grew(coalescing_before, coalescing_after, "inference_calls_total")
    assert grew(before, after, "request_success") == calls
    executions = grew(before, after, "exec_count")
    assert executions < len(order), "the concurrent requests ran one by one"
    # Each Triton request's time in Triton's queue is exported, as quantiles per model.
    assert grew(before, after, "queue_summary_us_count") == calls
    assert after["queue_summary_us_sum"] > before["queue_summary_us_sum"]


def test_a_request_mixing_short_and_long_texts_equals_each_text_alone(stack: RunningStack) -> None:
    alone, _ = _alone(stack)
    mixed = list(range(len(TEXTS)))[::-1]
    response = httpx.post(
        f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": [TEXTS[i] for i in mixed]}, timeout=60
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(_vectors(response.json()), alone[mixed], atol=TOLERANCE)


async def test_a_bad_request_among_concurrent_ones_fails_alone(stack: RunningStack) -> None:
    """A token id outside the vocabulary is refused by the inference service naming the input. When
    that request shares a call with others, only it gets the error, numbered as in its own body."""
    alone, _ = _alone(stack)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120) as client:

        async def good(index: int) -> httpx.Response:
            return await client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[index]})

        async def bad() -> httpx.Response:
            return await client.post("/v1/embeddings", json={"model": MODEL, "input": [[101, 10_000_000, 102]]})

        order = [index % len(TEXTS) for index in range(24)]
        responses = await asyncio.gather(*(good(index) for index in order[:12]), bad(), *(good(i) for i in order[12:]))
    refused = responses[12]
    assert refused.status_code == 400, refused.text
    assert "Input 0 has token id 10000000" in refused.json()["error"]["message"]
    answered = responses[:12] + responses[13:]
    for index, response in zip(order, answered, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_vectors(response.json())[0], alone[index], atol=TOLERANCE)
