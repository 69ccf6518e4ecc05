"""Workload 2: embeddings throughput and latency, and workload 4: the services' added latency.

Every contender serves all-MiniLM-L6-v2 from the same files. Loads: one client sending batches
of 1, 8 and 32 texts, and 8 and 32 clients sending one text each (1 client x 1 text is both).
Rounds interleave the contenders, so a neighbour's burst on the shared machine hits all alike.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.bench_embed_concurrency import corpus, start_infinity
from benchmarks.suite import embedders
from benchmarks.suite.context import MINILM, Context
from benchmarks.suite.measure import closed_loop, fmt, fmt_ratio, median, percentile, ratio_per_round

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
LOADS = [  # (label, clients, texts per request)
    ("batch 1", 1, 1),
    ("batch 8", 1, 8),
    ("batch 32", 1, 32),
    ("8 clients", 8, 1),
    ("32 clients", 32, 1),
]
BATCH_ONLY = "onnxruntime in-process, bucketed"  # bucketing changes nothing for one text


def _requests(texts: list[str], per_request: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(texts) for _ in range(per_request)] for _ in range(300)]


async def _contenders(ctx: Context, notes: list[str]) -> list:
    stack = ctx.stack
    threads = max(n for _, n, _ in LOADS)
    found: list = []
    if stack is not None:
        onnx = sorted((stack.home / "triton" / "models" / MINILM).rglob("*.onnx"))
        found.append(embedders.HttpEmbedder("modelplane gateway", int(stack.gateway_url.rsplit(":", 1)[1]), MINILM))
        found.append(embedders.InferenceGrpcEmbedder(stack.inference, MINILM))
        triton = embedders.TritonEmbedder(stack.triton_grpc, MINILM, ctx.minilm, MAX_TOKENS)
        await triton.start()
        found.append(triton)
        if onnx:
            for bucketed in (False, True):
                found.append(
                    embedders.OnnxEmbedder(onnx[0], ctx.minilm, MAX_TOKENS, bucketed=bucketed, threads=threads)
                )
        else:
            notes.append("onnxruntime in-process not measured: the stack's model repository has no model.onnx.")
    else:
        notes.append("Only in-process contenders ran (no stack was started: --no-stack).")
    found.append(embedders.SentenceTransformerEmbedder(ctx.minilm, threads=threads))
    return found


async def _parity(contenders: list, text: str) -> dict[str, float]:
    """Cosine of each contender's vector for one text to sentence-transformers': proof that
    every contender serves the same model."""
    vectors = {c.name: np.asarray((await c.embed([text]))[0]) for c in contenders}
    reference = vectors["sentence-transformers in-process"]
    return {name: float(v @ reference / (np.linalg.norm(v) * np.linalg.norm(reference))) for name, v in vectors.items()}


async def run(ctx: Context, *, infinity: bool) -> dict:
    texts = corpus()
    notes: list[str] = []
    contenders = await _contenders(ctx, notes)
    server = None
    try:
        if infinity:
            ctx.say("starting infinity-emb")
            try:
                server = start_infinity(ctx.work, ctx.minilm)
            except (RuntimeError, OSError) as error:
                notes.append(f"infinity-emb not measured: {str(error).splitlines()[0]}")
            else:
                contenders.append(embedders.HttpEmbedder("infinity-emb", server.port, MINILM, path="/embeddings"))
        parity = await _parity(contenders, texts[0])
        points: dict[str, dict[str, list[dict]]] = {}
        for round_number in range(ctx.sizes.rounds):
            for label, clients, per_request in LOADS:
                requests = _requests(texts, per_request, seed=clients * 100 + per_request)
                for contender in contenders:
                    if contender.name == BATCH_ONLY and per_request == 1:
                        continue
                    point = await closed_loop(
                        contender.embed, requests, clients, ctx.sizes.seconds, ctx.sizes.warmup_seconds
                    )
                    points.setdefault(contender.name, {}).setdefault(label, []).append(point.as_dict())
                    ctx.say(
                        f"round {round_number + 1} {contender.name:<36} {label:<11} "
                        f"{point.texts_per_second:7.1f} texts/s p50 {point.p50_ms:6.1f} ms p99 {point.p99_ms:6.1f} ms"
                    )
    finally:
        for contender in contenders:
            await contender.close()
        if server is not None:
            server.stop()
    return {
        "status": "ran",
        "contenders": [c.name for c in contenders],
        "loads": [label for label, _, _ in LOADS],
        "points": points,
        "parity_cosine": parity,
        "texts": len(texts),
        "rounds": ctx.sizes.rounds,
        "seconds": ctx.sizes.seconds,
        "notes": notes,
    }


def _series(data: dict, contender: str, load: str, key: str) -> list[float]:
    return [p[key] for p in data["points"].get(contender, {}).get(load, [])]


def targets(data: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the embedding targets of the issue."""
    gateway = "modelplane gateway"
    rows = []
    for other, goal, label in (
        ("onnxruntime in-process", 0.8, "gateway ≥ 0.8× onnxruntime in-process at batch 32"),
        (BATCH_ONLY, 0.8, "(same, against onnxruntime run in length buckets as modelplane's model does)"),
        ("infinity-emb", 1.0, "gateway ahead of infinity-emb at batch 32"),
    ):
        ratios = ratio_per_round(
            _series(data, gateway, "batch 32", "texts_per_second"), _series(data, other, "batch 32", "texts_per_second")
        )
        if not ratios:
            continue
        met = median(ratios) >= goal if other != "infinity-emb" else median(ratios) > goal
        rows.append((label, fmt_ratio(ratios), "met" if met else "**missed**"))
    single = ratio_per_round(
        _series(data, gateway, "32 clients", "texts_per_second"), _series(data, gateway, "batch 32", "texts_per_second")
    )
    if single:
        met = median(single) >= 0.8
        rows.append(("32 single-text clients ≥ 0.8× batch-32 requests, gateway", fmt_ratio(single), _verdict(met)))
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def _contender_table(data: dict, cell: Callable[[str, str], str]) -> list[str]:
    """A markdown table: a row per contender, a column per load, `cell(contender, load)` in each."""
    loads = data["loads"]
    lines = ["| contender | " + " | ".join(loads) + " |", "| --- |" + " ---: |" * len(loads)]
    for contender in data["contenders"]:
        lines.append(f"| {contender} | " + " | ".join(cell(contender, load) for load in loads) + " |")
    return lines


def render(data: dict) -> str:
    def throughput(contender: str, load: str) -> str:
        tps = _series(data, contender, load, "texts_per_second")
        if not tps:
            return "–"
        p50 = median(_series(data, contender, load, "p50_ms"))
        p99 = median(_series(data, contender, load, "p99_ms"))
        return f"**{median(tps):.0f}**<br>{p50:.1f} / {p99:.1f}"

    def against_gateway(contender: str, load: str) -> str:
        ratios = ratio_per_round(
            _series(data, contender, load, "texts_per_second"),
            _series(data, "modelplane gateway", load, "texts_per_second"),
        )
        return fmt(median(ratios), 2) + "×" if ratios else "–"

    lines = [
        "Texts/s (median over rounds), then p50 / p99 latency in ms per request.",
        "",
        *_contender_table(data, throughput),
        "",
        "Throughput relative to the gateway, taken within each round (median over rounds; above 1 is faster "
        "than the gateway):",
        "",
        *_contender_table(data, against_gateway),
    ]
    parity = ", ".join(f"{name} {value:.5f}" for name, value in data["parity_cosine"].items())
    lines += ["", f"Same model everywhere: cosine of one text's vector to sentence-transformers': {parity}."]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    loads = data["loads"]
    width = 0.8 / max(1, len(data["contenders"]))
    for i, contender in enumerate(data["contenders"]):
        values = [median(_series(data, contender, load, "texts_per_second")) for load in loads]
        axes[0].bar([x + i * width for x in range(len(loads))], values, width, label=contender)
        p50 = [median(_series(data, contender, load, "p50_ms")) for load in loads]
        axes[1].plot(loads, p50, marker="o", label=contender)
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(loads))], loads)
    axes[0].set_ylabel("texts / s (median)")
    axes[0].set_title("all-MiniLM-L6-v2 throughput")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p50 latency per request, ms (log)")
    axes[1].set_title("latency")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- workload 4: overhead ---------------------------------------------------------------------


async def run_overhead(ctx: Context) -> dict:
    """One text per request, one client, the three network contenders taking turns request by
    request (the same text for each), so every sample of the three shares the moment's noise."""
    assert ctx.stack is not None
    stack = ctx.stack
    contenders = [
        embedders.TritonEmbedder(stack.triton_grpc, MINILM, ctx.minilm, MAX_TOKENS),
        embedders.InferenceGrpcEmbedder(stack.inference, MINILM),
        embedders.HttpEmbedder("modelplane gateway", int(stack.gateway_url.rsplit(":", 1)[1]), MINILM),
    ]
    await contenders[0].start()
    texts = corpus()
    rng = random.Random(4)
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    try:
        for c in contenders:  # connections open, first-call costs paid
            for _ in range(5):
                await c.embed([texts[0]])
        for i in range(ctx.sizes.overhead_requests):
            text = rng.choice(texts)
            for c in contenders[i % 3 :] + contenders[: i % 3]:
                started = time.perf_counter()
                await c.embed([text])
                samples[c.name].append(1000 * (time.perf_counter() - started))
    finally:
        for c in contenders:
            with contextlib.suppress(Exception):
                await c.close()
    summary = {name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)} for name, v in samples.items()}
    return {"status": "ran", "samples_ms": samples, "summary": summary, "requests": ctx.sizes.overhead_requests}


def render_overhead(data: dict) -> str:
    s = data["summary"]
    triton, inference, gateway = s["Triton direct"], s["inference gRPC"], s["modelplane gateway"]
    lines = [
        "| path | p50 ms | p99 ms | added over Triton direct, p50 ms | added, p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| Triton direct (tokenise + tritonclient gRPC + normalise, in the caller) | {triton['p50_ms']:.2f} | "
        f"{triton['p99_ms']:.2f} | – | – |",
        f"| inference service gRPC | {inference['p50_ms']:.2f} | {inference['p99_ms']:.2f} | "
        f"{inference['p50_ms'] - triton['p50_ms']:+.2f} | {inference['p99_ms'] - triton['p99_ms']:+.2f} |",
        f"| gateway HTTP → inference → Triton | {gateway['p50_ms']:.2f} | {gateway['p99_ms']:.2f} | "
        f"**{gateway['p50_ms'] - triton['p50_ms']:+.2f}** | {gateway['p99_ms'] - triton['p99_ms']:+.2f} |",
    ]
    return "\n".join(lines)


def overhead_target(data: dict) -> tuple[str, str, str]:
    s = data["summary"]
    added = s["modelplane gateway"]["p50_ms"] - s["Triton direct"]["p50_ms"]
    return (
        "gateway + inference overhead over Triton directly < 2 ms at p50 (one text; issue 22, was 3 ms)",
        f"{added:.2f} ms",
        "met" if added < 2 else "**missed**",
    )


def plot_overhead(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(8, 4.5))
    names = list(data["samples_ms"])
    samples = [data["samples_ms"][n] for n in names]
    high = max(percentile(s, 99) for s in samples) * 1.2
    axis.boxplot(samples, whis=(1, 99), showfliers=False)
    axis.set_xticks(range(1, len(names) + 1), names)
    axis.set_ylim(0, high)
    axis.set_ylabel("ms per one-text request (box: quartiles, whiskers: p1-p99)")
    axis.set_title("added latency of the gateway and the inference service")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
