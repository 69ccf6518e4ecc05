"""What one onnxruntime call of the embedding model costs, by its shape and thread count.

    .venv/bin/python benchmarks/bench_onnx_calls.py [--model PATH/model.onnx] [--calls 30]

Runs the converted all-MiniLM-L6-v2 (`model.onnx` from the benchmark stacks' cache, which `make
bench` fills; or --model) on onnxruntime with the session options modelplane's encoder model uses
(threads that do not spin, one inter-op thread), with 2 (all cores here) and 1 intra-op threads,
over batches of rows × tokens, each call after a short idle as in a served model, and prints the
CPU and wall time per call and the CPU per token. A fit of CPU = fixed + per-token × tokens says
what a call costs before its first token: what `bucket_merge_tokens` weighs padding against.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(1, 16), (1, 32), (2, 16), (4, 16), (8, 16), (8, 32), (8, 64), (16, 32), (32, 16), (32, 32)]


def _model() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelplane" / "bench"
    found = sorted((root / "modelplane-cache" / "artifacts").glob("*/*/model.onnx"))
    if not found:
        sys.exit(f"no converted model.onnx under {root}; run `make bench` once, or pass --model")
    return found[0]


def _measure(path: Path, threads: int, calls: int) -> list[tuple[tuple[int, int], float, float]]:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]
    results = []
    for rows, width in SHAPES:
        ids = np.full((rows, width), 2054, np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feed = {name: feed[name] for name in names}
        for _ in range(3):
            session.run(None, feed)
        cpu = wall = 0.0
        for _ in range(calls):
            time.sleep(0.005)  # idle between calls, as a served model is between executions
            cpu_at, wall_at = time.process_time(), time.perf_counter()
            session.run(None, feed)
            cpu += time.process_time() - cpu_at
            wall += time.perf_counter() - wall_at
        results.append(((rows, width), 1000 * cpu / calls, 1000 * wall / calls))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    path = args.model or _model()
    print(f"{path}\n| intra-op threads | rows × tokens | CPU ms per call | wall ms per call | CPU µs per token |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for threads in (2, 1):
        results = _measure(path, threads, args.calls)
        for (rows, width), cpu, wall in results:
            print(f"| {threads} | {rows} × {width} | {cpu:.2f} | {wall:.2f} | {1000 * cpu / (rows * width):.0f} |")
        # Up to 512 tokens a call, where attention's share (quadratic in the width) is still small.
        small = [(rows * width, cpu) for (rows, width), cpu, _ in results if rows * width <= 512]
        per_token, fixed = np.polyfit([tokens for tokens, _ in small], [cpu for _, cpu in small], 1)
        print(
            f"| {threads} | fit | {fixed:.2f} ms a call + {1000 * per_token:.0f} µs a token "
            f"(a call = {fixed / per_token:.0f} tokens) | | |"
        )


if __name__ == "__main__":
    main()
