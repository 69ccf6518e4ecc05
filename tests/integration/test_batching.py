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


def _alone(stack: RunningStack) -> np.ndarray:
    """Each text in a request of its own, one request at a time: nothing to batch with."""
    rows = []
    for text in TEXTS:
        response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": [text]}, timeout=60)
        assert response.status_code == 200, response.text
        rows.append(_vectors(response.json())[0])
    return np.stack(rows)


def _triton_metrics(stack: RunningStack) -> dict[str, float]:
    text = httpx.get(stack.triton_metrics_url, timeout=10).text
    values = {}
    for name in ("request_success", "exec_count", "queue_summary_us_count", "queue_summary_us_sum"):
        found = re.search(rf'^nv_inference_{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values


def _coalescing_metrics(stack: RunningStack) -> dict[str, float]:
    text = httpx.get(stack.metrics["inference"], timeout=10).text
    values = {}
    for name in ("calls_total", "chunks_total", "wait_seconds_count"):
        found = re.search(rf'^modelplane_inference_encoder_{name}{{model="{MODEL}"}} (\S+)$', text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values


async def _concurrently(stack: RunningStack, order: list[int]) -> list[np.ndarray]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120) as client:

        async def one(index: int) -> np.ndarray:
            response = await client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[index]})
            assert response.status_code == 200, response.text
            return _vectors(response.json())[0]

        return await asyncio.gather(*(one(index) for index in order))


async def test_concurrent_requests_are_batched_and_each_text_gets_its_own_embedding(stack: RunningStack) -> None:
    alone = _alone(stack)
    before, coalescing_before = _triton_metrics(stack), _coalescing_metrics(stack)
    order = [index for index in range(len(TEXTS)) for _ in range(6)]
    random.Random(7).shuffle(order)
    together = await _concurrently(stack, order)
    after, coalescing_after = _triton_metrics(stack), _coalescing_metrics(stack)

    for index, vector in zip(order, together, strict=True):
        np.testing.assert_allclose(vector, alone[index], atol=TOLERANCE, err_msg=f"text {index}: {TEXTS[index][:40]}")

    def grew(values_before: dict[str, float], values_after: dict[str, float], name: str) -> float:
        return values_after[name] - values_before[name]

    # The inference service sent each request's texts once, some of them in a shared call, and
    # measured each one's wait for a call slot.
    calls = grew(coalescing_before, coalescing_after, "calls_total")
    assert grew(coalescing_before, coalescing_after, "chunks_total") == len(order)
    assert grew(coalescing_before, coalescing_after, "wait_seconds_count") == len(order)
    assert grew(before, after, "request_success") == calls
    executions = grew(before, after, "exec_count")
    assert executions < len(order), "the concurrent requests ran one by one"
    # Each Triton request's time in Triton's queue is exported, as quantiles per model.
    assert grew(before, after, "queue_summary_us_count") == calls
    assert after["queue_summary_us_sum"] > before["queue_summary_us_sum"]


def test_a_request_mixing_short_and_long_texts_equals_each_text_alone(stack: RunningStack) -> None:
    alone = _alone(stack)
    mixed = list(range(len(TEXTS)))[::-1]
    response = httpx.post(
        f"{stack.gateway_url}/v1/embeddings", json={"model": MODEL, "input": [TEXTS[i] for i in mixed]}, timeout=60
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(_vectors(response.json()), alone[mixed], atol=TOLERANCE)
