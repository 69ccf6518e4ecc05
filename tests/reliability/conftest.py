"""The reliability suite's stack: `modelplane up` (through the one stack starter,
tests/integration/conftest.py) with an API key, S3 credentials, a slow HTTP source on loopback and
a host budget that holds three of the tiny encoders, so faults, load and evictions meet.

Every test records what it measured in `figures`; the terminal summary prints them at the end of
the run (requests, errors by kind, latency percentiles, recovery times, memory before and after).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest

from modelplane.common.types import WORKING_STATES, Model, ModelSpec, ModelState, Task
from modelplane.loader.client import LoaderClient
from modelplane.loader.errors import TritonUnavailable
from modelplane.loader.triton_control import TritonControl
from modelplane.registry.client import RegistryClient
from tests.encoders import save_tiny_bert
from tests.integration.conftest import CROSS_ENCODER, RunningStack, cross_encoder_path, running_stack
from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3Server

MIB = 2**20
T = TypeVar("T")
# Each tiny encoder holds 34 MiB of its own once loaded, and they share 25-30 MiB of runtime:
# 160 MiB less the 10% margin (144 MiB) holds three (about 130), never four.
HOST_BUDGET = 160 * MIB
# The gateway's key for this run; the log scan proves it never reaches a log.
API_KEY = "sk-reliability-" + secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# 0, 1: loaded from the start; 2, 3: loaded and evicted under load; 4: the cycles; 5: conversion
# killed; 6: a bad file in Triton's repository.
ENCODERS = [f"rel-enc-{i}" for i in range(7)]
S3_MODEL = "rel-s3-enc"  # fetched with the S3 credentials the log scan looks for
HTTP_MODEL = "rel-http-enc"  # fetched slowly over HTTP, so the loader can be killed mid-fetch

__all__ = ["cross_encoder_path"]  # the integration fixture, shared
_FIGURES: list[str] = []


def record(line: str) -> None:
    """A figure for the run's summary (also printed now, for `pytest -s`)."""
    print(line)
    _FIGURES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the suite (`pytest -m reliability` runs it alone); the log scan reads the logs of
    everything else the suite did, so it runs last."""
    for item in items:
        if item.nodeid.startswith("tests/reliability/"):
            item.add_marker(pytest.mark.reliability)
    # Right after the suite's other tests, not at the end of the session: the stack is
    # package-scoped and a later package would see it stopped and a new one started.
    scan = [item for item in items if item.nodeid.startswith("tests/reliability/test_logs.py")]
    rest = [item for item in items if item not in scan]
    suite = [i for i, item in enumerate(rest) if item.nodeid.startswith("tests/reliability/")]
    end = suite[-1] + 1 if suite else len(rest)
    items[:] = rest[:end] + scan + rest[end:]


@pytest.fixture(scope="package")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def encoder_paths(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel-encoders")
    # Each its own seed, so its own digest: no package is a cache hit for another.
    names = [*ENCODERS, S3_MODEL, HTTP_MODEL]
    return {name: save_tiny_bert(root / name, minilm_path, seed=100 + i) for i, name in enumerate(names)}


class SlowFileServer:
    """A plain HTTP file server on loopback that sends large files slowly (64 KiB every
    `pause` seconds), so a fetch is still running when a test kills the loader."""

    def __init__(self, root: Path, pause: float = 0.05) -> None:
        state = self
        self.root = root
        self.pause = pause
        self.bytes_sent: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _file(self) -> Path | None:
                path = (state.root / self.path.lstrip("/")).resolve()
                if not path.is_file() or not path.is_relative_to(state.root.resolve()):
                    self.send_error(404)
                    return None
                return path

            def do_HEAD(self) -> None:
                path = self._file()
                if path is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(path.stat().st_size))
                    self.send_header("ETag", f'"{path.stat().st_mtime_ns}"')
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def do_GET(self) -> None:
                path = self._file()
                if path is None:
                    return
                data = path.read_bytes()
                wanted = self.headers.get("Range", "bytes=0-")
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                relative = path.relative_to(state.root.resolve()).as_posix()
                state.gets[relative] += 1
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{path.stat().st_mtime_ns}"')
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                with contextlib.suppress(OSError):
                    for offset in range(start, len(data), 64 * 1024):
                        self.wfile.write(data[offset : offset + 64 * 1024])
                        state.bytes_sent[relative] += min(64 * 1024, len(data) - offset)
                        if len(data) > 1024 * 1024:
                            time.sleep(state.pause)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="package")
def slow_http(tmp_path_factory: pytest.TempPathFactory, encoder_paths: dict[str, Path]) -> Iterator[SlowFileServer]:
    """The HTTP model's package served with its SHA256SUMS, as an internal file server would."""
    root = tmp_path_factory.mktemp("rel-http")
    package = root / HTTP_MODEL
    shutil.copytree(encoder_paths[HTTP_MODEL], package)
    files = sorted(p for p in package.rglob("*") if p.is_file())
    sums = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(package).as_posix()}\n" for p in files
    )
    (package / "SHA256SUMS").write_text(sums)
    server = SlowFileServer(root)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def rel(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[RunningStack]:
    env = {
        "MODELPLANE_GATEWAY_API_KEYS": API_KEY,
        "MODELPLANE_GATEWAY_REQUEST_TIMEOUT_SECONDS": "20",
        "MODELPLANE_LOADER_HOST_MEMORY_BYTES": str(HOST_BUDGET),
        "MODELPLANE_LOADER_PRELOAD": "false",
        "MODELPLANE_LOADER_EVICTION_GRACE_SECONDS": "0.5",
        "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "1",
        "MODELPLANE_LOADER_RECONCILE_INTERVAL_SECONDS": "5",
        "MODELPLANE_LOADER_HTTP_TIMEOUT_SECONDS": "120",
        "MODELPLANE_LOADER_S3_ENDPOINT_URL": s3.endpoint,
        "MODELPLANE_LOADER_S3_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
        "MODELPLANE_LOADER_S3_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY,
        "MODELPLANE_INFERENCE_STATS_REPORT_INTERVAL_SECONDS": "0.5",
        "MODELPLANE_TRITON_RESTART_BACKOFF_MAX_SECONDS": "2",
    }
    with running_stack(tmp_path_factory.mktemp("rel-home"), extra_env=env, bundled=False) as running:
        yield running


@pytest.fixture(scope="package")
async def models(
    rel: RunningStack, s3: S3Server, encoder_paths: dict[str, Path], cross_encoder_path: Path
) -> dict[str, Path]:
    """The tiny encoders, the cross-encoder and one encoder fetched from S3, all registered; the
    first two encoders and the cross-encoder loaded."""
    s3.upload_tree("rel-models", S3_MODEL, encoder_paths[S3_MODEL])
    async with RegistryClient(rel.registry) as registry:
        for name in ENCODERS:
            await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(encoder_paths[name])))
        await registry.register(ModelSpec(name=CROSS_ENCODER, task=Task.RERANK, source_uri=str(cross_encoder_path)))
        await registry.register(ModelSpec(name=S3_MODEL, task=Task.EMBEDDING, source_uri=f"s3://rel-models/{S3_MODEL}"))
    async with LoaderClient(rel.loader) as loader:
        for name in (ENCODERS[0], ENCODERS[1], CROSS_ENCODER):
            await loader.ensure_loaded(name, reason="test", timeout_seconds=300)
    return {**encoder_paths, CROSS_ENCODER: cross_encoder_path}


# Reading the stack ---------------------------------------------------------------------------


async def registry_models(stack: RunningStack) -> dict[str, Model]:
    async with RegistryClient(stack.registry) as registry:
        return {m.name: m for m in await registry.list_models()}


async def states(stack: RunningStack) -> dict[str, ModelState]:
    return {name: model.state for name, model in (await registry_models(stack)).items()}


async def triton_ready(stack: RunningStack) -> set[str]:
    control = TritonControl(stack.triton_grpc)
    try:
        return {m.name for m in await control.index() if m.state == "READY"}
    except TritonUnavailable:
        return set()
    finally:
        await control.close()


async def until(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], limit_seconds: float) -> T:
    """Polls another process's state until `done` holds; fails after `limit_seconds`."""
    deadline = time.monotonic() + limit_seconds
    while True:
        with contextlib.suppress(Exception):
            value = await read()
            if done(value):
                return value
        if time.monotonic() > deadline:
            value = await read()
            assert done(value), f"still {value!r} after {limit_seconds:.0f} s"
            return value
        await asyncio.sleep(0.2)


async def consistent(stack: RunningStack) -> None:
    """The registry tells the truth about Triton: READY exactly where Triton has it ready, and
    nothing left in a working state once the loader is idle."""

    async def read() -> tuple[dict[str, ModelState], set[str]]:
        return await states(stack), await triton_ready(stack)

    def true(snapshot: tuple[dict[str, ModelState], set[str]]) -> bool:
        registry, triton = snapshot
        ready = {name for name, state in registry.items() if state == ModelState.READY}
        settled = all(state not in WORKING_STATES for state in registry.values())
        return settled and ready == triton

    await until(read, true, 120)


def service_processes(stack: RunningStack) -> dict[str, psutil.Process]:
    """The stack's processes by role: registry, loader, inference, gateway, tritonserver."""
    found: dict[str, psutil.Process] = {}
    for process in psutil.Process(stack.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if process.name() == "tritonserver":
                found["tritonserver"] = process
            elif len(command) >= 2 and command[-2] == "serve":
                found[command[-1]] = process
    return found


def rss_mib(process: psutil.Process) -> float:
    """VmRSS from /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_gateway(stack: RunningStack, limit_seconds: float = 120) -> None:
    async def ready() -> int:
        async with httpx.AsyncClient(timeout=2) as client:
            # The gateway and its backends, not the models: some tests leave FAILED models behind.
            return (await client.get(f"{stack.gateway_url}/readyz", params={"exclude": "models"})).status_code

    await until(ready, lambda status: status == 200, limit_seconds)
