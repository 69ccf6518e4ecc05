"""Which llama.cpp binding serves GGUF models: xllamacpp against llama-cpp-python, measured on the
same GGUF files, greedy, in the same run (issue 20's engine decision).

    .venv/bin/python -m benchmarks.bench_engines                 # both bundled GGUFs, 1 and 4 streams
    .venv/bin/python -m benchmarks.bench_engines --max-tokens 32 --requests 2 --install

Each engine runs in its own process and environment: xllamacpp from modelplane's (it is a
dependency), llama-cpp-python from the benchmark environment the suite keeps under
~/.cache/modelplane/bench/ (from a llama-cpp-python wheel the suite builds once per machine).
Both run as modelplane serves them: xllamacpp as llama.cpp's C++ server in-process with one slot per
stream (continuous batching); llama-cpp-python as one `Llama` per slot, each driven by its own
thread, which is what modelplane's Triton model did with it. OMP_WAIT_POLICY=PASSIVE for both.

Measured per engine and model: load time; time to first token and decode tokens/s of one stream;
tokens/s of all streams together at 4 concurrent streams. `--install` also times a first install
of each binding into an empty virtual environment from the package registry (llama-cpp-python
builds from source: minutes). Prints one JSON object and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Tell me about the history of bread.",
]
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GEMMA = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


# --- the worker: runs inside one engine's environment, imports nothing from the project ----------


def _xllamacpp_engine(model: str, slots: int, n_ctx: int):
    import xllamacpp  # noqa: PLC0415

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.n_parallel = slots
    params.n_ctx = n_ctx * slots
    params.cpuparams.n_threads = os.cpu_count() or 1
    params.cpuparams_batch.n_threads = os.cpu_count() or 1
    params.warmup = False
    server = xllamacpp.Server(params)

    def generate(prompt: str, max_tokens: int, on_token) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "cache_prompt": False}

        def on_chunk(chunk: dict) -> bool:
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                on_token()
            return False

        server.handle_completions(body, on_chunk)

    return generate


def _llama_cpp_python_engine(model: str, slots: int, n_ctx: int):
    from llama_cpp import Llama  # noqa: PLC0415

    threads = max(1, (os.cpu_count() or 1) // slots)
    pool = [Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, verbose=False) for _ in range(slots)]
    free = list(pool)
    lock = threading.Condition()

    def generate(prompt: str, max_tokens: int, on_token) -> None:
        with lock:
            lock.wait_for(lambda: free)
            llm = free.pop()
        try:
            llm.reset()
            for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
                if chunk["choices"][0]["text"]:
                    on_token()
        finally:
            with lock:
                free.append(llm)
                lock.notify()

    return generate


def _worker(args: dict) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    make = {"xllamacpp": _xllamacpp_engine, "llama-cpp-python": _llama_cpp_python_engine}[args["engine"]]
    template = args["template"]
    started = time.perf_counter()
    generate = make(args["model"], max(args["streams"]), 2048)
    load_s = time.perf_counter() - started
    generate(template.format("Hello"), 4, lambda: None)  # first-call costs, untimed

    def one(prompt: str) -> dict:
        stamps: list[float] = []
        sent = time.perf_counter()
        generate(template.format(prompt), args["max_tokens"], lambda: stamps.append(time.perf_counter()))
        first, last = (stamps[0], stamps[-1]) if stamps else (sent, sent)
        return {"ttft_s": first - sent, "tokens": len(stamps), "decode_s": last - first}

    loads = {}
    for streams in args["streams"]:
        records: list[dict] = []

        def client(offset: int, streams: int = streams, records: list[dict] = records) -> None:
            for i in range(args["requests"]):
                records.append(one(PROMPTS[(offset + i * streams) % len(PROMPTS)]))

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        loads[str(streams)] = {"wall_s": time.perf_counter() - began, "requests": records}
    return {"load_s": load_s, "loads": loads}


# --- the driver -------------------------------------------------------------------------------


def _summary(result: dict) -> dict:
    out = {"load_s": round(result["load_s"], 2)}
    for streams, load in result["loads"].items():
        records = load["requests"]
        out[f"ttft_ms@{streams}"] = round(1000 * statistics.median(r["ttft_s"] for r in records), 1)
        decode = [(r["tokens"] - 1) / r["decode_s"] for r in records if r["decode_s"] > 0]
        out[f"stream_tok_s@{streams}"] = round(statistics.median(decode), 1) if decode else 0.0
        out[f"total_tok_s@{streams}"] = round(sum(r["tokens"] for r in records) / load["wall_s"], 1)
    return out


def _run_worker(python: Path, args: dict) -> dict:
    done = subprocess.run(
        [str(python), __file__, "--worker", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args['engine']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _install_seconds(package: str) -> float:
    """Seconds for `pip install PACKAGE` into an empty environment, without pip's cache."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "venv", folder], check=True)
        started = time.perf_counter()
        subprocess.run(
            [f"{folder}/bin/pip", "install", "--quiet", "--no-cache-dir", package],
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per stream")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--install", action="store_true", help="also time a first install of each binding")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    from benchmarks.suite.context import QUICK, Context, gemma_gguf, llama_python  # noqa: PLC0415
    from modelplane.bundled import bundled_models  # noqa: PLC0415

    ctx = Context(work=Path(tempfile.mkdtemp()), sizes=QUICK.__class__(), minilm=Path())
    llama, why = llama_python(ctx)
    models = {spec.name: Path(spec.source_uri) for spec in bundled_models() if spec.source_uri.endswith(".gguf")}
    if "gemma-3-270m" not in models:
        gemma, _ = gemma_gguf(ctx)
        if gemma is not None:
            models["gemma-3-270m"] = gemma
    engines = {"xllamacpp": Path(sys.executable)}
    if llama is not None:
        engines["llama-cpp-python"] = llama
    else:
        print(f"llama-cpp-python not measured: {why}", file=sys.stderr)
    streams = [int(s) for s in args.streams.split(",")]
    results: dict[str, dict[str, dict]] = {}
    for name, path in models.items():
        template = GEMMA if "gemma" in name else CHATML
        for engine, python in engines.items():
            print(f"{engine} on {name}", file=sys.stderr, flush=True)
            raw = _run_worker(
                python,
                {
                    "engine": engine,
                    "model": str(path),
                    "template": template,
                    "streams": streams,
                    "max_tokens": args.max_tokens,
                    "requests": args.requests,
                },
            )
            results.setdefault(name, {})[engine] = _summary(raw)
    report: dict = {"models": results}
    if args.install:
        report["install_s"] = {
            "xllamacpp": round(_install_seconds("xllamacpp"), 1),
            "llama-cpp-python": round(_install_seconds("llama-cpp-python==0.3.36"), 1),
        }
    print(json.dumps(report, indent=1))
    keys = sorted({k for model in results.values() for r in model.values() for k in r})
    print("| model | engine | " + " | ".join(keys) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in keys) + " |")
    for model, by_engine in results.items():
        for engine, row in by_engine.items():
            print(f"| {model} | {engine} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
