"""Gemma 3 270M (the bundled GGUF): time to first token and tokens/s through modelplane's gateway,
against llama-cpp-python called in-process on the same machine, in the same run.

    .venv/bin/python benchmarks/bench_chat.py                     # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_chat.py --rounds 1 --max-tokens 64 --json /tmp/chat.json

modelplane is started as `make run` starts it (`modelplane up`, bundled models). Each request is a
streamed greedy completion of the same story prompt (66 tokens) with a fixed number of new tokens;
TTFT counts from sending the request to the first text chunk, tokens/s per stream from the first
chunk to the last (the decode rate), aggregate tokens/s from the first request sent to the last
chunk of all. The in-process baseline runs llama-cpp-python with the engine configuration the
served model has (context, threads per slot, one Llama per slot fed from one queue), so the ratio
is the cost of serving (HTTP, gateway, gRPC, inference service, Triton), not of a different
configuration. Rounds interleave the two systems, so a neighbour's load on a shared machine hits
both alike; figures are medians over rounds.

Other tools call `main(argv)` (`make bench`); `run_benchmark`, `measure_gateway` and
`measure_in_process` are importable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' stack starter

from tests.integration.conftest import RunningStack
from tests.integration.conftest import running_stack as _stack_starter

MODEL = "gemma-3-270m"
PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. He had done so for forty years, "
    "through storms and calm nights alike, and he knew every step by the sound it made under his boots. "
    "That evening, as the wind rose and the sea turned grey, he noticed a small boat far out beyond the rocks,"
)
TARGET_RATIO = 0.9
SERVICES = ("registry", "loader", "inference")


@dataclass(frozen=True)
class StreamTiming:
    ttft_s: float
    tokens: int
    decode_tokens_per_s: float
    finished_at: float


@dataclass(frozen=True)
class Measurement:
    system: str
    streams: int
    ttft_s: float  # median over the streams
    decode_tokens_per_s: float  # median over the streams
    aggregate_tokens_per_s: float
    # CPU time spent per generated token by every process involved (for the gateway: the stack's
    # processes and this client); unlike wall-clock rates it barely moves with a neighbour's load.
    cpu_ms_per_token: float = 0.0


def _summarise(system: str, timings: list[StreamTiming], started: float, cpu_s: float) -> Measurement:
    tokens = sum(t.tokens for t in timings)
    return Measurement(
        system=system,
        streams=len(timings),
        ttft_s=statistics.median(t.ttft_s for t in timings),
        decode_tokens_per_s=statistics.median(t.decode_tokens_per_s for t in timings),
        aggregate_tokens_per_s=tokens / (max(t.finished_at for t in timings) - started),
        cpu_ms_per_token=cpu_s * 1e3 / max(tokens, 1),
    )


def processes_cpu_seconds(home: Path | None) -> float:
    """CPU seconds used so far by this process and, given a stack's home, by every process of that
    stack (found by MODELPLANE_HOME in their environment: services, tritonserver, backend stubs)."""
    total = time.process_time()
    if home is None:
        return total
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("MODELPLANE_HOME") == str(home):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0


# --- through the gateway ---------------------------------------------------------------------


async def _gateway_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> StreamTiming:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return StreamTiming(first - sent, tokens, _decode_rate(tokens, first, last), last)


def measure_gateway(url: str, streams: int, max_tokens: int, home: Path | None = None) -> Measurement:
    """`streams` concurrent streamed completions through the gateway at `url` (of the stack whose
    home is `home`, for its CPU time)."""

    async def run() -> Measurement:
        async with httpx.AsyncClient(timeout=600) as client:
            cpu = processes_cpu_seconds(home)
            started = time.perf_counter()
            timings = await asyncio.gather(*(_gateway_stream(client, url, max_tokens) for _ in range(streams)))
            cpu = processes_cpu_seconds(home) - cpu
        return _summarise("gateway", list(timings), started, cpu)

    return asyncio.run(run())


# --- llama-cpp-python in-process --------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """What the served model runs with (from its Triton config), for the in-process baseline."""

    gguf: Path
    n_ctx: int
    slots: int
    threads_per_slot: int


def _in_process_stream(llm: Any, max_tokens: int, sent: float) -> StreamTiming:
    """Greedy decoding with llama-cpp-python's own generation loop and the sampling arguments the
    served model passes, detokenising each token as a streaming client would."""
    import llama_cpp  # noqa: PLC0415

    first = last = 0.0
    tokens = 0
    llm.reset()  # as the served model: no KV prefix reuse between requests
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    vocab = llm._model.vocab
    generated = llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    try:
        for token in generated:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            llm.detokenize([token])
            last = time.perf_counter()
            first = first or last
            tokens += 1
            if tokens >= max_tokens:
                break
    finally:
        generated.close()
    return StreamTiming(first - sent, tokens, _decode_rate(tokens, first, last), last)


class InProcessEngine:
    """One llama-cpp-python `Llama` per slot, each on its own thread, fed from one queue: the shape
    of the served model, without Triton and the services in front of it."""

    def __init__(self, config: EngineConfig) -> None:
        from llama_cpp import Llama  # noqa: PLC0415 - optional for importers of this module

        self.jobs: queue.Queue[tuple[int, float, queue.Queue[StreamTiming]] | None] = queue.Queue()
        self.llms = [
            Llama(
                model_path=str(config.gguf),
                n_ctx=config.n_ctx,
                n_threads=config.threads_per_slot,
                n_threads_batch=config.threads_per_slot,
                verbose=False,
            )
            for _ in range(config.slots)
        ]
        self.threads = [threading.Thread(target=self._work, args=(llm,), daemon=True) for llm in self.llms]
        for thread in self.threads:
            thread.start()

    def _work(self, llm: Any) -> None:
        while (job := self.jobs.get()) is not None:
            max_tokens, sent, results = job
            results.put(_in_process_stream(llm, max_tokens, sent))

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        for llm in self.llms:
            llm.close()  # type: ignore[attr-defined]


def measure_in_process(engine: InProcessEngine, streams: int, max_tokens: int) -> Measurement:
    results: queue.Queue[StreamTiming] = queue.Queue()
    cpu = time.process_time()  # this process's threads: the engine's slots
    started = time.perf_counter()
    for _ in range(streams):
        engine.jobs.put((max_tokens, time.perf_counter(), results))
    timings = [results.get() for _ in range(streams)]
    return _summarise("in-process", timings, started, time.process_time() - cpu)


# --- the stack ------------------------------------------------------------------------------


@contextmanager
def running_stack(workdir: Path) -> Iterator[RunningStack]:
    """`modelplane up` with the bundled models on free ports (the tests' starter), conversions
    reused from a cache that later runs share."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelplane" / "bench-cache"
    with _stack_starter(workdir, extra_env={"MODELPLANE_LOADER_CACHE_DIR": str(cache)}) as stack:
        yield stack


def served_engine_config(stack: RunningStack) -> EngineConfig:
    """The served Gemma's engine configuration, read from the Triton entry the loader wrote."""
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    entry = stack.home / "triton" / "models" / MODEL
    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    slots = int(parameters.get("engine_slots", "1"))
    threads = int(parameters.get("n_threads", "0")) or max(1, len(os.sched_getaffinity(0)) // slots)
    gguf = next(entry.glob("*/" + parameters["gguf_path"]))
    return EngineConfig(gguf=gguf, n_ctx=int(parameters["n_ctx"]), slots=slots, threads_per_slot=threads)


# --- the run --------------------------------------------------------------------------------


def run_benchmark(rounds: int, max_tokens: int, stream_counts: tuple[int, ...]) -> dict[str, object]:
    """Starts modelplane, measures both systems in interleaved rounds, and returns the results."""
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as workdir, running_stack(Path(workdir)) as stack:
        config = served_engine_config(stack)
        engine = InProcessEngine(config)
        try:
            measure_gateway(stack.gateway_url, 1, 8)  # warm both: first requests pay for lazy set-up
            measure_in_process(engine, 1, 8)
            for number in range(1, rounds + 1):
                for streams in stream_counts:
                    for measured in (
                        measure_gateway(stack.gateway_url, streams, max_tokens, stack.home),
                        measure_in_process(engine, streams, max_tokens),
                    ):
                        measurements.append(measured)
                        _progress(number, measured)
        finally:
            engine.close()
    return {"config": asdict(config) | {"gguf": str(config.gguf)}, "summary": summarise(measurements, stream_counts)}


def _progress(number: int, measured: Measurement) -> None:
    print(
        f"round {number}: {measured.system:<10} {measured.streams} stream(s): TTFT {measured.ttft_s * 1e3:6.0f} ms, "
        f"{measured.decode_tokens_per_s:5.1f} tok/s per stream, {measured.aggregate_tokens_per_s:5.1f} tok/s in all, "
        f"{measured.cpu_ms_per_token:5.2f} ms CPU/token",
        file=sys.stderr,
    )


def summarise(measurements: list[Measurement], stream_counts: tuple[int, ...]) -> list[dict[str, float | int]]:
    rows: list[dict[str, float | int]] = []
    for streams in stream_counts:

        def median(system: str, attribute: str, streams: int = streams) -> float:
            values = [getattr(m, attribute) for m in measurements if m.system == system and m.streams == streams]
            return statistics.median(values)

        row: dict[str, float | int] = {"streams": streams}
        for system in ("gateway", "in-process"):
            for attribute in ("ttft_s", "decode_tokens_per_s", "aggregate_tokens_per_s", "cpu_ms_per_token"):
                row[f"{system}.{attribute}"] = median(system, attribute)
        row["ratio.cpu_ms_per_token"] = row["gateway.cpu_ms_per_token"] / row["in-process.cpu_ms_per_token"]
        row["ratio.ttft_s"] = row["gateway.ttft_s"] / row["in-process.ttft_s"]
        row["ratio.decode_tokens_per_s"] = row["gateway.decode_tokens_per_s"] / row["in-process.decode_tokens_per_s"]
        row["ratio.aggregate_tokens_per_s"] = (
            row["gateway.aggregate_tokens_per_s"] / row["in-process.aggregate_tokens_per_s"]
        )
        rows.append(row)
    return rows


def print_table(results: dict[str, object], rounds: int, max_tokens: int) -> None:
    config = results["config"]
    print(
        f"Gemma 3 270M Q4_K_M, greedy, {max_tokens} new tokens, medians of {rounds} round(s); engine: "
        f"n_ctx {config['n_ctx']}, {config['slots']} slot(s) x {config['threads_per_slot']} thread(s), "
        f"{len(os.sched_getaffinity(0))} CPUs"  # type: ignore[index]
    )
    print(
        f"{'streams':>7} | {'system':<10} | {'TTFT ms':>8} | {'tok/s per stream':>16} | {'tok/s in all':>12} | "
        f"{'CPU ms/token':>12}"
    )
    for row in results["summary"]:  # type: ignore[attr-defined]
        for system in ("in-process", "gateway"):
            print(
                f"{row['streams']:>7} | {system:<10} | {row[f'{system}.ttft_s'] * 1e3:>8.0f} | "
                f"{row[f'{system}.decode_tokens_per_s']:>16.1f} | {row[f'{system}.aggregate_tokens_per_s']:>12.1f} | "
                f"{row[f'{system}.cpu_ms_per_token']:>12.2f}"
            )
        print(
            f"{row['streams']:>7} | {'ratio':<10} | {row['ratio.ttft_s']:>7.2f}x | "
            f"{row['ratio.decode_tokens_per_s']:>15.2f}x | {row['ratio.aggregate_tokens_per_s']:>11.2f}x | "
            f"{row['ratio.cpu_ms_per_token']:>11.2f}x"
        )
    print(
        f"Target: gateway tokens/s >= {TARGET_RATIO}x in-process. On a shared machine the wall-clock rates move "
        "with other load; CPU ms/token (serving cost) does not."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="concurrent streams to measure")
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    args = parser.parse_args(argv)
    results = run_benchmark(args.rounds, args.max_tokens, tuple(args.streams))
    print_table(results, args.rounds, args.max_tokens)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
