"""Workload 3: chat. Time to first token and tokens/s for Gemma 3 270M at 1 and 4 concurrent
streams: modelplane's gateway, llama-cpp-python's own OpenAI-compatible server, and
llama-cpp-python in-process. All three run the same GGUF with the same llama.cpp build, greedy,
with Gemma's turn format, and OMP_WAIT_POLICY=PASSIVE (modelplane's model sets it: spinning
OpenMP threads cost a shared machine more than they save). llama-cpp-python runs with its default
thread count, half the CPUs (1 here), which is also what each of modelplane's two engine slots
uses: on this busy 2-core VM one thread decoded about 80 tokens/s and two about 50."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.bench_embed_concurrency import Server, free_port, wait_for
from benchmarks.suite.context import GEMMA, Context, gemma_gguf, llama_python
from benchmarks.suite.measure import fmt, fmt_ratio, median, ratio_per_round

STREAMS = (1, 4)
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Tell me about the history of bread.",
    "What makes a good cup of tea?",
    "Describe the city of Lisbon.",
    "Write a letter to a friend about a holiday.",
    "Explain what a compiler does.",
]
GATEWAY = "modelplane gateway"
SERVER = "llama-cpp-python server"
IN_PROCESS = "llama-cpp-python in-process"


async def _stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    tokens = (usage or {}).get("completion_tokens") or chunks
    return {"ttft_s": (first or sent) - sent, "tokens": tokens, "decode_s": (last or sent) - (first or sent)}


async def _http_load(url: str, model: str, streams: int, requests: int, max_tokens: int) -> dict:
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=300) as client:
        await _stream_one(client, url, model, "Hello", 4)  # connection and first-call costs

        async def stream(offset: int) -> None:
            for i in range(requests):
                prompt = PROMPTS[(offset + i * streams) % len(PROMPTS)]
                records.append(await _stream_one(client, url, model, prompt, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(stream(n) for n in range(streams)))
        return {"wall_s": time.perf_counter() - started, "requests": records}


def start_llama_server(python: Path, gguf: Path | str, ctx: Context, chat_format: str = "gemma") -> Server:
    """llama-cpp-python's own OpenAI-compatible server on the GGUF, on a free loopback port."""
    port = free_port()
    log = ctx.work / f"llama-server-{chat_format}.log"
    command = [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--chat_format", chat_format,
        # By default a new request interrupts the one being generated: concurrent streams would end
        # early, cut off. Queued instead, they are served in turn, as modelplane's one slot serves them.
        "--interrupt_requests", "false",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(SERVER, port, process, log)
    wait_for(server, "Uvicorn running", 300)
    return server


def _in_process(python: Path, gguf: Path, ctx: Context) -> dict:
    args = {
        "model_path": str(gguf),
        "prompts": PROMPTS,
        "max_tokens": ctx.sizes.chat_max_tokens,
        "streams": list(STREAMS),
        "requests": ctx.sizes.chat_requests,
    }
    out = subprocess.run(
        [str(python), str(Path(__file__).with_name("llama_inprocess.py")), json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gateway_serves_chat(ctx: Context) -> str:
    """Why the gateway cannot be measured, or "" when it can."""
    assert ctx.stack is not None
    paths = httpx.get(f"{ctx.stack.gateway_url}/openapi.json", timeout=10).json()["paths"]
    if "/v1/chat/completions" not in paths:
        return "this build of the gateway has no POST /v1/chat/completions (chat serving, issue 5, has not landed)"
    models = httpx.get(f"{ctx.stack.gateway_url}/v1/models", timeout=10).json()["data"]
    if GEMMA not in {m["id"] for m in models}:
        return f"the stack does not serve {GEMMA}"
    return ""


async def run(ctx: Context) -> dict:
    python, why = llama_python(ctx)
    gguf, why_gguf = gemma_gguf(ctx) if python is not None else (None, why)
    if python is None or gguf is None:
        return {"status": "skipped", "reason": why or why_gguf}
    notes = [
        "llama-cpp-python's server runs with `--interrupt_requests false`: with its default (true) a new "
        "request interrupts the one being generated, so concurrent streams were cut off mid-answer "
        "(seen in the first run of this benchmark: the 4-stream load failed with incomplete responses)."
    ]
    gateway_why = _gateway_serves_chat(ctx) if ctx.stack is not None else "no stack was started (--no-stack)"
    if gateway_why:
        notes.append(f"The gateway was not measured: {gateway_why}.")
    ctx.say("starting llama-cpp-python's server")
    server = start_llama_server(python, gguf, ctx)
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        for round_number in range(ctx.sizes.rounds):
            for streams in STREAMS:
                key = str(streams)
                args = (streams, ctx.sizes.chat_requests, ctx.sizes.chat_max_tokens)
                if not gateway_why:
                    url = f"{ctx.stack.gateway_url}/v1/chat/completions"
                    results.setdefault(GATEWAY, {}).setdefault(key, []).append(await _http_load(url, GEMMA, *args))
                url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
                results.setdefault(SERVER, {}).setdefault(key, []).append(await _http_load(url, GEMMA, *args))
            ctx.say(f"round {round_number + 1}: llama-cpp-python in-process")
            for key, value in _in_process(python, gguf, ctx).items():
                results.setdefault(IN_PROCESS, {}).setdefault(key, []).append(value)
    finally:
        server.stop()
    return {
        "status": "ran",
        "results": results,
        "notes": notes,
        "gateway_not_measured": gateway_why,
        "max_tokens": ctx.sizes.chat_max_tokens,
    }


def _summaries(load: dict) -> dict[str, float]:
    """One load (one round, one stream count): TTFT p50, per-stream decode tokens/s, total tokens/s."""
    records = load["requests"]
    return {
        "ttft_ms": 1000 * median([r["ttft_s"] for r in records]),
        "stream_tokens_per_s": median([(r["tokens"] - 1) / r["decode_s"] for r in records if r["decode_s"] > 0]),
        "total_tokens_per_s": sum(r["tokens"] for r in records) / load["wall_s"],
        "tokens": median([r["tokens"] for r in records]),
    }


def _per_round(data: dict, contender: str, streams: int, key: str) -> list[float]:
    return [_summaries(load)[key] for load in data["results"].get(contender, {}).get(str(streams), [])]


def render(data: dict) -> str:
    lines = [
        "| contender | streams | TTFT p50 ms | tokens/s per stream (decode) | tokens/s, all streams "
        "| tokens per answer |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for contender in data["results"]:
        for streams in STREAMS:
            cells = [
                fmt(median(_per_round(data, contender, streams, key)), 1)
                for key in ("ttft_ms", "stream_tokens_per_s", "total_tokens_per_s", "tokens")
            ]
            lines.append(f"| {contender} | {streams} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(data: dict) -> list[tuple[str, str, str]]:
    rows = []
    if GATEWAY not in data.get("results", {}):
        return rows
    for streams in STREAMS:
        for other, goal, label in (
            (IN_PROCESS, 0.9, f"gateway tokens/s ≥ 0.9× llama-cpp-python in-process ({streams} stream(s))"),
            (SERVER, 1.0, f"gateway tokens/s ahead of llama-cpp-python's server ({streams} stream(s))"),
        ):
            ratios = ratio_per_round(
                _per_round(data, GATEWAY, streams, "total_tokens_per_s"),
                _per_round(data, other, streams, "total_tokens_per_s"),
            )
            met = median(ratios) >= goal if goal < 1 else median(ratios) > goal
            rows.append((label, fmt_ratio(ratios), "met" if met else "**missed**"))
    return rows


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    contenders = list(data["results"])
    width = 0.8 / max(1, len(contenders))
    for i, contender in enumerate(contenders):
        xs = [x + i * width for x in range(len(STREAMS))]
        axes[0].bar(xs, [median(_per_round(data, contender, s, "ttft_ms")) for s in STREAMS], width, label=contender)
        axes[1].bar(
            xs, [median(_per_round(data, contender, s, "total_tokens_per_s")) for s in STREAMS], width, label=contender
        )
    for axis, title in ((axes[0], "time to first token, ms (p50)"), (axes[1], "tokens/s, all streams together")):
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(STREAMS))], [f"{s} stream(s)" for s in STREAMS])
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.suptitle("Gemma 3 270M Q4_K_M, greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
