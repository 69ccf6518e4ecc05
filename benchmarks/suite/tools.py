"""Workload: tools and structured output on the bundled SmolLM2-135M-Instruct, greedy. (1) What a
JSON-schema grammar costs: decode tokens/s of one stream with `response_format` json_schema against
the same model and prompt unconstrained, through the gateway (target: constrained ≥ 0.8×).
(2) Time to the first tool call: the latency of a blocking request with one tool and a named
`tool_choice` through the gateway, against llama-cpp-python's own server (`--chat_format
chatml-function-calling`, which constrains a named call with a grammar too) on the same GGUF and
the same request (target: faster)."""

from __future__ import annotations

import json
import time

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
CITIES = ["Paris", "Lisbon", "Oslo", "Rome", "Vienna", "Dublin", "Prague", "Madrid", "Berlin", "Athens"]
TOOL_REQUEST = {
    "tools": [TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "temperature": 0,
    "max_tokens": 64,
}
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


async def _tool_call_latency(client: httpx.AsyncClient, url: str, model: str, city: str = "Paris") -> float:
    # Each request asks about another city: a server that keeps the last prompt's KV cache
    # (llama-cpp-python's does) would otherwise skip the whole prompt of a repeated request. The
    # shared prefix (the tools' description) it still reuses; modelplane does not (prefix_cache off).
    messages = [{"role": "user", "content": f"What is the weather in {city} right now?"}]
    started = time.perf_counter()
    response = await client.post(url, json={"model": model, "messages": messages, **TOOL_REQUEST})
    elapsed = time.perf_counter() - started
    calls = response.json()["choices"][0]["message"].get("tool_calls") if response.status_code == 200 else None
    if not calls:
        raise RuntimeError(f"{url}: no tool call: {response.status_code} {response.text[:300]}")
    json.loads(calls[0]["function"]["arguments"])
    return elapsed


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
    server = start_llama_server(python, gguf, ctx, "chatml-function-calling") if python is not None else None
    max_tokens = ctx.sizes.chat_max_tokens * 2
    rates: dict[str, list[list[float]]] = {CONSTRAINED: [], FREE: []}
    latencies: dict[str, list[list[float]]] = {GATEWAY: [], SERVER: []}
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            await _tool_call_latency(client, gateway, MODEL)  # first-call costs, untimed
            if server is not None:
                await _tool_call_latency(client, f"http://127.0.0.1:{server.port}/v1/chat/completions", MODEL)
            for _ in range(ctx.sizes.rounds):
                for name, constrained in ((CONSTRAINED, True), (FREE, False)):
                    runs = [await _decode_rate(client, gateway, constrained, max_tokens) for _ in range(3)]
                    rates[name].append([r["tokens_per_s"] for r in runs])
                cities = [CITIES[(3 * len(latencies[GATEWAY]) + i) % len(CITIES)] for i in range(3)]
                latencies[GATEWAY].append([await _tool_call_latency(client, gateway, MODEL, c) for c in cities])
                if server is not None:
                    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
                    latencies[SERVER].append([await _tool_call_latency(client, url, MODEL, c) for c in cities])
    finally:
        if server is not None:
            server.stop()
    return {"status": "ran", "rates": rates, "latencies": latencies, "notes": notes, "max_tokens": max_tokens}


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
    return "\n".join(lines + [f"- {note}" for note in data.get("notes", [])])


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
