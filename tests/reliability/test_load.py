"""Load: 64 concurrent clients through the gateway for a bounded time, embeddings on two encoders
and rerank on the cross-encoder, while a churn client asks for two more encoders in turn, so the
loader loads them on demand and evicts to stay within the host budget (it holds three).

Asserted: every answer is 200 or a documented 429/503 with Retry-After, every 200 is complete and
in order, and afterwards the registry tells the truth about Triton. Printed: requests, errors by
kind, latency percentiles per endpoint, evictions. Streamed chat is in test_chat.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from modelplane.loader.client import LoaderClient
from tests.integration.conftest import CROSS_ENCODER, RunningStack
from tests.reliability.conftest import AUTH, ENCODERS, consistent, record, states

CLIENTS = 64
SECONDS = float(os.environ.get("MODELPLANE_RELIABILITY_LOAD_SECONDS", "30"))
SERVING = [ENCODERS[0], ENCODERS[1]]
CHURN = [ENCODERS[2], ENCODERS[3]]


class Results:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.problems: list[str] = []

    def add(self, endpoint: str, seconds: float, response: httpx.Response) -> None:
        self.statuses[endpoint][response.status_code] += 1
        if response.status_code == 200:
            self.latencies[endpoint].append(seconds)
        elif response.status_code in (429, 503):
            if int(response.headers.get("Retry-After", "0")) < 1:
                self.problems.append(f"{endpoint} {response.status_code} without Retry-After")
        else:
            self.problems.append(f"{endpoint} {response.status_code}: {response.text[:300]}")


async def _embed(client: httpx.AsyncClient, results: Results, model: str, n: int) -> None:
    texts = [f"text {i} for {model}" for i in range(n)]
    started = time.monotonic()
    response = await client.post("/v1/embeddings", json={"model": model, "input": texts})
    results.add("embeddings", time.monotonic() - started, response)
    if response.status_code == 200:
        data = response.json()["data"]
        if [item["index"] for item in data] != list(range(n)) or any(len(i["embedding"]) != 32 for i in data):
            results.problems.append(f"embeddings: incomplete or out of order answer for {n} inputs")


async def _rerank(client: httpx.AsyncClient, results: Results, n: int) -> None:
    documents = [f"document {i}" for i in range(n)]
    started = time.monotonic()
    response = await client.post("/v1/rerank", json={"model": CROSS_ENCODER, "query": "q", "documents": documents})
    results.add("rerank", time.monotonic() - started, response)
    if response.status_code == 200 and sorted(r["index"] for r in response.json()["results"]) != list(range(n)):
        results.problems.append("rerank: a document missing or repeated")


async def test_64_clients_with_loads_and_evictions(rel: RunningStack, models: object) -> None:
    results = Results()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)

    async with httpx.AsyncClient(base_url=rel.gateway_url, headers=AUTH, timeout=60, limits=limits) as client:

        async def steady(index: int) -> None:
            rng = np.random.default_rng(index)
            while not stop.is_set():
                if index % 4 == 3:
                    await _rerank(client, results, int(rng.integers(1, 9)))
                else:
                    await _embed(client, results, SERVING[index % 2], int(rng.integers(1, 9)))

        async def churn() -> None:
            turn = 0
            while not stop.is_set():
                await _embed(client, results, CHURN[turn % 2], 1)
                turn += 1

        evictions_before = await _evictions(rel)
        started = time.monotonic()
        tasks = [asyncio.create_task(steady(i)) for i in range(CLIENTS)] + [asyncio.create_task(churn())]
        await asyncio.sleep(SECONDS)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started

    evictions = await _evictions(rel) - evictions_before
    total = sum(sum(c.values()) for c in results.statuses.values())
    record(f"load: {CLIENTS} clients + 1 churn client for {elapsed:.0f} s: {total} requests ({total / elapsed:.0f}/s)")
    for endpoint, counts in sorted(results.statuses.items()):
        lat = np.array(results.latencies[endpoint]) * 1000
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if len(lat) else (0, 0, 0)
        record(f"  {endpoint:<10} {dict(sorted(counts.items()))}  p50 {p50:.0f} ms  p95 {p95:.0f} ms  p99 {p99:.0f} ms")
    record(f"  models loaded on demand and evicted meanwhile: {evictions} evictions; states {await _short(rel)}")
    assert results.problems == []
    assert all(set(counts) <= {200, 429, 503} for counts in results.statuses.values())
    assert results.statuses["embeddings"][200] > 0 and results.statuses["rerank"][200] > 0
    assert evictions >= 1  # the churn really made the loader evict under load
    async with LoaderClient(rel.loader) as loader:
        for name in CHURN:
            await loader.unload(name)
    await consistent(rel)


async def _evictions(stack: RunningStack) -> int:
    """modelplane_loader_evictions_total, as Prometheus scrapes it from the loader."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(stack.metrics["loader"])).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "modelplane_loader_evictions_total"
        )
    )


async def _short(stack: RunningStack) -> dict[str, str]:
    return {name: state.name for name, state in (await states(stack)).items() if name.startswith("rel-enc")}
