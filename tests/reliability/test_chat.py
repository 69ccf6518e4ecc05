"""Streamed chat under load and through a restart, on a stack of its own: a tiny random-weight
Llama (converted by the loader to ONNX with a KV cache, onnxruntime-genai in Triton) and a tiny
encoder, with no memory budget (the main suite's budget is sized for encoders).

Greedy decoding makes every answer knowable: each stream, joined, must equal the non-streamed
answer to the same prompt, so a lost, duplicated or reordered chunk shows. A stream whose
inference service is killed must end (an error chunk or a closed connection), never hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelplane.common.types import ModelFormat, ModelSpec, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.causal_lms import build_causal_lm
from tests.encoders import save_tiny_bert
from tests.integration.conftest import RunningStack, running_stack
from tests.reliability.conftest import record, service_processes, until

LLM = "rel-tiny-llama"
ENCODER = "rel-chat-enc"
PROMPTS = [f"Once upon a time {i}" for i in range(8)]
SECONDS = float(os.environ.get("MODELPLANE_RELIABILITY_LOAD_SECONDS", "30"))


@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    env = {"MODELPLANE_LOADER_PRELOAD": "false", "MODELPLANE_GATEWAY_REQUEST_TIMEOUT_SECONDS": "60"}
    with running_stack(tmp_path_factory.mktemp("rel-chat-home"), extra_env=env, bundled=False) as running:
        yield running


@pytest.fixture(scope="module")
async def served(chat_stack: RunningStack, tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> None:
    llm = build_causal_lm("llama", tmp_path_factory.mktemp("rel-llama"))
    encoder = save_tiny_bert(tmp_path_factory.mktemp("rel-chat-enc") / ENCODER, minilm_path, seed=7)
    async with RegistryClient(chat_stack.registry) as registry:
        await registry.register(
            ModelSpec(name=LLM, task=Task.GENERATION, format=ModelFormat.HUGGINGFACE, source_uri=str(llm))
        )
        await registry.register(ModelSpec(name=ENCODER, task=Task.EMBEDDING, source_uri=str(encoder)))
    async with LoaderClient(chat_stack.loader) as loader:
        await loader.ensure_loaded(LLM, reason="test", timeout_seconds=600)
        await loader.ensure_loaded(ENCODER, reason="test", timeout_seconds=300)


def _body(prompt: str, stream: bool, max_tokens: int = 16) -> dict[str, object]:
    return {
        "model": LLM,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def _references(client: httpx.AsyncClient) -> dict[str, tuple[str, int]]:
    answers = {}
    for prompt in PROMPTS:
        response = await client.post("/v1/chat/completions", json=_body(prompt, stream=False))
        assert response.status_code == 200, response.text
        answer = response.json()
        answers[prompt] = (answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"])
    return answers


class Stream:
    """One streamed answer as a client reads it."""

    def __init__(self) -> None:
        self.status = 0
        self.pieces: list[str] = []
        self.finish_reasons: list[str] = []
        self.usage: dict[str, int] | None = None
        self.error: str | None = None
        self.done = False
        self.first_token: float | None = None


async def _stream(client: httpx.AsyncClient, body: dict[str, object]) -> Stream:
    stream = Stream()
    started = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            stream.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                stream.error = response.text
                return stream
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    stream.done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    stream.error = chunk["error"]["message"]
                    continue
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        stream.first_token = stream.first_token or time.monotonic() - started
                        stream.pieces.append(choice["delta"]["content"])
                    if choice["finish_reason"]:
                        stream.finish_reasons.append(choice["finish_reason"])
                if chunk.get("usage"):
                    stream.usage = chunk["usage"]
    except httpx.TransportError as error:
        stream.error = f"connection: {type(error).__name__}"
    return stream


async def test_streamed_chat_under_load_loses_and_duplicates_no_chunk(chat_stack: RunningStack, served: None) -> None:
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    problems: list[str] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
    async with httpx.AsyncClient(base_url=chat_stack.gateway_url, timeout=120, limits=limits) as client:
        references = await _references(client)

        async def chatter(index: int) -> None:
            turn = 0
            while not stop.is_set():
                prompt = PROMPTS[(index + turn) % len(PROMPTS)]
                turn += 1
                started = time.monotonic()
                stream = await _stream(client, _body(prompt, stream=True))
                statuses["chat (stream)"][stream.status] += 1
                if stream.status != 200:
                    if stream.status != 503:
                        problems.append(f"chat {stream.status}: {stream.error}")
                    continue
                latencies["chat (stream)"].append(time.monotonic() - started)
                latencies["chat first token"].append(stream.first_token or 0.0)
                text, tokens = references[prompt]
                if not stream.done or stream.error or "".join(stream.pieces) != text:
                    problems.append(f"stream for {prompt!r}: {stream.pieces} (error {stream.error}), expected {text!r}")
                if len(stream.finish_reasons) != 1 or (stream.usage or {}).get("completion_tokens") != tokens:
                    problems.append(f"stream for {prompt!r}: finish {stream.finish_reasons}, usage {stream.usage}")

        async def embedder(index: int) -> None:
            while not stop.is_set():
                started = time.monotonic()
                response = await client.post("/v1/embeddings", json={"model": ENCODER, "input": [f"text {index}"]})
                statuses["embeddings"][response.status_code] += 1
                if response.status_code == 200:
                    latencies["embeddings"].append(time.monotonic() - started)
                elif response.status_code != 503:
                    problems.append(f"embeddings {response.status_code}: {response.text[:200]}")

        tasks = [asyncio.create_task(chatter(i)) for i in range(24)]
        tasks += [asyncio.create_task(embedder(i)) for i in range(40)]
        started = time.monotonic()
        await asyncio.sleep(SECONDS)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started

    total = sum(sum(c.values()) for c in statuses.values())
    record(f"chat load: 24 streaming + 40 embedding clients for {elapsed:.0f} s: {total} requests")
    for name, values in sorted(latencies.items()):
        p50, p95, p99 = np.percentile(np.array(values) * 1000, [50, 95, 99]) if values else (0, 0, 0)
        counts = dict(statuses.get(name, {}))
        record(f"  {name:<17} {counts or ''}  p50 {p50:.0f} ms  p95 {p95:.0f} ms  p99 {p99:.0f} ms")
    assert problems == []
    assert statuses["chat (stream)"][200] > 0 and statuses["embeddings"][200] > 0


async def test_streams_end_when_the_inference_service_is_killed(chat_stack: RunningStack, served: None) -> None:
    async with httpx.AsyncClient(base_url=chat_stack.gateway_url, timeout=120) as client:
        streams = [asyncio.create_task(_stream(client, _body(p, stream=True, max_tokens=200))) for p in PROMPTS]
        await asyncio.sleep(0.5)  # the streams are running
        inference = service_processes(chat_stack)["inference"]
        os.kill(inference.pid, signal.SIGKILL)
        killed = time.monotonic()
        ended = await asyncio.wait_for(asyncio.gather(*streams), timeout=90)  # none is left hanging
        ended_after = time.monotonic() - killed

        async def answered() -> int:
            return (await client.post("/v1/chat/completions", json=_body(PROMPTS[0], stream=False))).status_code

        await until(answered, lambda status: status == 200, 120)
        back = time.monotonic() - killed
    outcomes = Counter(
        "completed" if s.done and not s.error else ("error chunk" if s.status == 200 else f"HTTP {s.status}")
        for s in ended
    )
    record(
        f"inference SIGKILL during {len(ended)} streams: {dict(outcomes)}; all ended {ended_after:.1f} s after the "
        f"kill; chat served again {back:.1f} s after it"
    )
    for stream in ended:
        # Either finished before the kill reached it, or told the client it ended (a stream's
        # error chunk, a 503, or a closed connection): never silence until a timeout.
        assert (stream.done and not stream.error) or stream.error, vars(stream)
        assert not (stream.done and stream.error), vars(stream)


async def test_huge_max_tokens_is_bounded_by_the_limits(chat_stack: RunningStack, served: None) -> None:
    async with httpx.AsyncClient(base_url=chat_stack.gateway_url, timeout=120) as client:
        response = await client.post("/v1/chat/completions", json=_body(PROMPTS[0], stream=False, max_tokens=10**12))
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert "max_tokens" in response.json()["error"]["message"]
    else:
        assert response.json()["usage"]["total_tokens"] <= 256  # the tiny model's context
