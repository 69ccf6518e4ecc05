"""Workload: tools and structured output on the bundled SmolLM2-135M-Instruct, greedy. (1) What a
JSON-schema grammar costs: decode tokens/s of one stream with `response_format` json_schema against
the same model and prompt unconstrained, through the gateway (target: constrained ≥ 0.8×).
(2) Time to the first tool call: the latency of a blocking request with one tool and a named
`tool_choice` through the gateway, against llama-cpp-python's own server (`--chat_format
chatml-function-calling`, which constrains a named call with a grammar too) on the same GGUF and
the same request (target: faster). Fair terms: the same GGUF file, the same request (with a system
message, as Dify's agent sends: without one, that chat format describes no tool to the model and
its prompt is 25 tokens against modelplane's ~130), the same threads (the Triton model's default,
all usable CPUs; llama-cpp-python's server would take half), greedy, and both warm: before each round's
timed requests one untimed request each, so each holds the shared prefix (system message and tool)
in its KV cache, as a serving engine does after an agent's first turn. Each timed request asks
about another city. The
prompt tokens each engine read per request (not taken from its cache) are read from its log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable

import httpx

from benchmarks.suite.chat import start_llama_server
from benchmarks.suite.context import Context, llama_python
from benchmarks.suite.measure import fmt, fmt_ratio, median, ratio_per_round

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
        "population": {"type": "integer"},
    },
    "required": ["name", "country", "landmarks", "population"],
}
PROMPT = "Describe the city of Paris: its name, country, landmarks and population."
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WARM_CITY = "Warsaw"
CITIES = ["Paris", "Lisbon", "Oslo", "Rome", "Vienna", "Dublin", "Prague", "Madrid", "Berlin", "Athens"]
TOOL_REQUEST = {
    "tools": [TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "temperature": 0,
    "max_tokens": 64,
}
SYSTEM = "You are a helpful assistant. Use the tools to answer questions about the weather."
CONSTRAINED, FREE = "json_schema grammar", "unconstrained"
GATEWAY, SERVER = "modelplane gateway", "llama-cpp-python server"


async def _decode_rate(client: httpx.AsyncClient, url: str, constrained: bool, max_tokens: int) -> dict:
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    first = last = None
    usage = {}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    tokens = usage.get("completion_tokens", 0)
    decode = (last or 0) - (first or 0)
    return {"tokens": tokens, "tokens_per_s": (tokens - 1) / decode if decode > 0 else 0.0}


# The prompt tokens an engine read for one request, from its log: modelplane's Triton model logs
# "prompt read N tokens"; llama-cpp-python's llama.cpp logs "prompt eval time = ... / N tokens".
PROMPT_READ = {
    GATEWAY: re.compile(r"\[llama\] request .*?prompt read (\d+) tokens"),
    SERVER: re.compile(r"prompt eval time =.*?/\s*(\d+) tokens"),
}


async def _prompt_read(log: Callable[[], str], contender: str, before: int) -> int | None:
    """The tokens read for the request that added a log line after the `before`-th; None when the
    line did not come within 5 s."""
    for _ in range(50):
        found = PROMPT_READ[contender].findall(log())
        if len(found) > before:
            return int(found[before])
        await asyncio.sleep(0.1)
    return None


Log = tuple[Callable[[], str], str]  # how to read a contender's log, and which contender it is


async def _tool_call_latency(
    client: httpx.AsyncClient, url: str, model: str, city: str = "Paris", log: Log | None = None
) -> tuple[float, int | None]:
    """Seconds to the tool call of one blocking request, and the prompt tokens the engine read for it."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is the weather in {city} right now?"},
    ]
    before = len(PROMPT_READ[log[1]].findall(log[0]())) if log else 0
    started = time.perf_counter()
    response = await client.post(url, json={"model": model, "messages": messages, **TOOL_REQUEST})
    elapsed = time.perf_counter() - started
    calls = response.json()["choices"][0]["message"].get("tool_calls") if response.status_code == 200 else None
    if not calls:
        raise RuntimeError(f"{url}: no tool call: {response.status_code} {response.text[:300]}")
    json.loads(calls[0]["function"]["arguments"])
    return elapsed, (await _prompt_read(log[0], log[1], before) if log else None)


async def run(ctx: Context) -> dict:
    if ctx.stack is None:
        return {"status": "skipped", "reason": "needs the modelplane stack (--no-stack was given)"}
    gateway = f"{ctx.stack.gateway_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=10) as client:
        models = (await client.get(f"{ctx.stack.gateway_url}/v1/models")).json()["data"]
    if MODEL not in {m["id"] for m in models}:
        return {"status": "skipped", "reason": f"the stack does not serve {MODEL}"}
    from modelplane.bundled import bundled_models  # noqa: PLC0415

    gguf = next(spec.source_uri for spec in bundled_models() if spec.name == MODEL)
    python, why = llama_python(ctx)
    notes = [] if python is not None else [f"llama-cpp-python's server was not measured: {why}."]
    # The Triton model's default: every CPU this process may run on.
    threads = len(os.sched_getaffinity(0))
    server = (
        start_llama_server(python, gguf, ctx, "chatml-function-calling", threads=threads)
        if python is not None
        else None
    )
    max_tokens = ctx.sizes.chat_max_tokens * 2
    rates: dict[str, list[list[float]]] = {CONSTRAINED: [], FREE: []}
    latencies: dict[str, list[list[float]]] = {GATEWAY: [], SERVER: []}
    prompt_read: dict[str, list[int | None]] = {GATEWAY: [], SERVER: []}
    # Triton's own log (the model's lines), beside the models in the stack's home.
    triton_log = ctx.stack.home / "triton" / "tritonserver.log"
    contenders: list[tuple[str, str, Log]] = [
        (GATEWAY, gateway, (lambda: triton_log.read_text(errors="replace") if triton_log.exists() else "", GATEWAY))
    ]
    if server is not None:
        server_log = server.log
        contenders.append(
            (
                SERVER,
                f"http://127.0.0.1:{server.port}/v1/chat/completions",
                (lambda: server_log.read_text(errors="replace"), SERVER),
            )
        )
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            for _ in range(ctx.sizes.rounds):
                cities = [CITIES[(3 * len(latencies[GATEWAY]) + i) % len(CITIES)] for i in range(3)]
                for name, url, log in contenders:
                    # Warm, untimed, with a city no timed request asks about: the shared prefix is
                    # then in the cache however the decode-rate requests of the last round used it.
                    await _tool_call_latency(client, url, MODEL, WARM_CITY, log)
                    timed = [await _tool_call_latency(client, url, MODEL, c, log) for c in cities]
                    latencies[name].append([seconds for seconds, _ in timed])
                    prompt_read[name] += [tokens for _, tokens in timed]
                for name, constrained in ((CONSTRAINED, True), (FREE, False)):
                    runs = [await _decode_rate(client, gateway, constrained, max_tokens) for _ in range(3)]
                    rates[name].append([r["tokens_per_s"] for r in runs])
    finally:
        if server is not None:
            server.stop()
    notes.append(
        f"Both contenders warm, {threads} thread(s) each, greedy, blocking; the request has a system message and one "
        "tool, rendered in modelplane's generic form and in llama-cpp-python's chatml-function-calling form."
    )
    return {
        "status": "ran",
        "rates": rates,
        "latencies": latencies,
        "prompt_read": prompt_read,
        "notes": notes,
        "max_tokens": max_tokens,
    }


def _medians(rounds: list[list[float]]) -> list[float]:
    return [median(values) for values in rounds]


def render(data: dict) -> str:
    lines = ["| measure | contender | per round (median) |", "| --- | --- | ---: |"]
    for name, rounds in data["rates"].items():
        lines.append(f"| decode tokens/s, one stream | {name} | {', '.join(fmt(v, 1) for v in _medians(rounds))} |")
    for name, rounds in data["latencies"].items():
        if rounds:
            cells = ", ".join(fmt(1000 * v, 0) for v in _medians(rounds))
            lines.append(f"| time to the first tool call, ms | {name} | {cells} |")
    for name, counts in data.get("prompt_read", {}).items():
        if counts:
            cells = ", ".join("?" if n is None else str(n) for n in counts)
            lines.append(f"| prompt tokens read per tool request (not from the cache) | {name} | {cells} |")
    return "\n".join(lines)  # the report adds the notes


def targets(data: dict) -> list[tuple[str, str, str]]:
    rows = []
    constrained = ratio_per_round(_medians(data["rates"][CONSTRAINED]), _medians(data["rates"][FREE]))
    rows.append(
        (
            "JSON-schema-constrained tokens/s ≥ 0.8× unconstrained (SmolLM2)",
            fmt_ratio(constrained),
            "met" if median(constrained) >= 0.8 else "**missed**",
        )
    )
    if data["latencies"][SERVER]:
        # A ratio above 1 means the gateway's first tool call came sooner.
        faster = ratio_per_round(_medians(data["latencies"][SERVER]), _medians(data["latencies"][GATEWAY]))
        rows.append(
            (
                "time to the first tool call: gateway faster than llama-cpp-python's server",
                fmt_ratio(faster),
                "met" if median(faster) > 1 else "**missed**",
            )
        )
    return rows
