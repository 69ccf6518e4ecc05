"""`modelplane up`: the whole embedded stack in one process tree.

The supervisor starts the embedded Triton, then each service in its own process
(`modelplane serve <name>`, exactly as in production), waits until each is healthy, registers the
bundled models and loads them all at once, prints the URL to give Dify as soon as the first serves
(modelplane/startup.py reports what is still coming), and a last line when every one is READY. A
child that dies is restarted with backoff; Ctrl-C or SIGTERM stops the gateway first and Triton last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.bundled import bundled_models
from modelplane.common.channels import open_channel
from modelplane.common.errors import ModelplaneError
from modelplane.common.process import die_with_parent
from modelplane.common.settings import ServerSettings, TritonSettings, modelplane_home
from modelplane.common.types import ModelSpec, Task
from modelplane.gateway.settings import GatewaySettings
from modelplane.inference.settings import InferenceSettings
from modelplane.loader.client import LoaderClient
from modelplane.loader.settings import LoaderSettings
from modelplane.registry.client import RegistryClient
from modelplane.registry.settings import RegistrySettings
from modelplane.startup import BundledLoad, BundledLoads
from modelplane.triton.embedded import EmbeddedTriton

log = structlog.get_logger()
ServerSettingsT = TypeVar("ServerSettingsT", bound=ServerSettings)

_RESTART_BACKOFF_MAX = 30.0
_STABLE_AFTER_SECONDS = 60.0
# Where `up` serves each service's Prometheus metrics unless MODELPLANE_<SERVICE>_METRICS_PORT says
# otherwise (the gateway serves its own at /metrics, Triton at its metrics port).
DEFAULT_METRICS_PORTS = {"registry": 9451, "loader": 9452, "inference": 9453}


class StackError(RuntimeError):
    pass


@dataclass
class ChildProcess:
    """One service process, restarted with backoff when it dies."""

    name: str
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    _stopping: bool = field(default=False, repr=False)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "modelplane.cli",
            "serve",
            self.name,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor only, which stops children in order
            preexec_fn=die_with_parent,
        )
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace: float = 15.0) -> None:
        self._stopping = True
        if not self.alive:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace)
        except TimeoutError:
            log.warning("service did not stop in time; killing it", service=self.name)
            self.process.kill()
            await self.process.wait()

    async def supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            if time.monotonic() - self.started_at > _STABLE_AFTER_SECONDS:
                backoff = 1.0
            self.restarts += 1
            log.error("service died; restarting", service=self.name, returncode=code, in_seconds=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)
            if not self._stopping:
                await self.start()


@dataclass(frozen=True)
class StackLayout:
    """Where everything listens, read from the same settings each service reads."""

    home: Path
    registry: RegistrySettings
    loader: LoaderSettings
    inference: InferenceSettings
    gateway: GatewaySettings
    triton: TritonSettings

    @classmethod
    def from_environment(cls) -> StackLayout:
        def with_metrics(settings: ServerSettingsT, service: str) -> ServerSettingsT:
            if settings.metrics_port:
                return settings
            return settings.model_copy(update={"metrics_port": DEFAULT_METRICS_PORTS[service]})

        return cls(
            home=modelplane_home(),
            registry=with_metrics(RegistrySettings(), "registry"),
            loader=with_metrics(LoaderSettings(), "loader"),
            inference=with_metrics(InferenceSettings(), "inference"),
            gateway=GatewaySettings(),
            triton=TritonSettings(),
        )

    @property
    def gateway_scheme(self) -> str:
        return "https" if self.gateway.tls_cert_file else "http"

    def metrics_endpoints(self) -> dict[str, str]:
        """Where Prometheus scrapes each process of the stack."""
        endpoints = {
            "registry": f"http://127.0.0.1:{self.registry.metrics_port}/metrics",
            "loader": f"http://127.0.0.1:{self.loader.metrics_port}/metrics",
            "inference": f"http://127.0.0.1:{self.inference.metrics_port}/metrics",
            "gateway": f"{self.gateway_scheme}://127.0.0.1:{self.gateway.port}/metrics",
        }
        if self.triton.embedded:
            endpoints["triton"] = f"http://127.0.0.1:{self.triton.metrics_port}/metrics"
        return endpoints

    def environment(self) -> dict[str, str]:
        """The variables every child gets, so all of them agree on every address."""
        internal = "127.0.0.1"
        registry = f"{internal}:{self.registry.port}"
        env = dict(os.environ)
        env.update(
            {
                "MODELPLANE_HOME": str(self.home),
                "MODELPLANE_REGISTRY_HOST": os.environ.get("MODELPLANE_REGISTRY_HOST", internal),
                "MODELPLANE_REGISTRY_PORT": str(self.registry.port),
                "MODELPLANE_REGISTRY_DATABASE_URL": self.registry.database_url,
                "MODELPLANE_REGISTRY_METRICS_PORT": str(self.registry.metrics_port),
                "MODELPLANE_LOADER_METRICS_PORT": str(self.loader.metrics_port),
                "MODELPLANE_INFERENCE_METRICS_PORT": str(self.inference.metrics_port),
                "MODELPLANE_LOADER_HOST": os.environ.get("MODELPLANE_LOADER_HOST", internal),
                "MODELPLANE_LOADER_PORT": str(self.loader.port),
                "MODELPLANE_LOADER_REGISTRY_ADDRESS": registry,
                "MODELPLANE_LOADER_CACHE_DIR": str(self.loader.cache_dir),
                "MODELPLANE_INFERENCE_HOST": os.environ.get("MODELPLANE_INFERENCE_HOST", internal),
                "MODELPLANE_INFERENCE_PORT": str(self.inference.port),
                "MODELPLANE_INFERENCE_REGISTRY_ADDRESS": registry,
                "MODELPLANE_INFERENCE_LOADER_ADDRESS": f"{internal}:{self.loader.port}",
                "MODELPLANE_GATEWAY_HOST": self.gateway.host,
                "MODELPLANE_GATEWAY_PORT": str(self.gateway.port),
                "MODELPLANE_GATEWAY_INFERENCE_ADDRESS": f"{internal}:{self.inference.port}",
                "MODELPLANE_GATEWAY_REGISTRY_ADDRESS": registry,
                "MODELPLANE_TRITON_GRPC_ADDRESS": self.triton.grpc_address,
                "MODELPLANE_TRITON_MODEL_REPOSITORY": str(self.triton.model_repository),
            }
        )
        return env


class Stack:
    def __init__(self, layout: StackLayout, *, load_bundled: bool = True) -> None:
        self.layout = layout
        self.load_bundled = load_bundled
        env = layout.environment()
        self.triton = EmbeddedTriton(layout.triton, workdir=layout.home / "triton") if layout.triton.embedded else None
        self.children = {name: ChildProcess(name, env) for name in ("registry", "loader", "inference", "gateway")}
        self._supervisors: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.triton is not None:
            await self.triton.start()
        await self._start_child("registry", self.layout.registry.port)
        await asyncio.gather(
            self._start_child("loader", self.layout.loader.port),
            self._start_child("inference", self.layout.inference.port),
        )
        await self._start_gateway()
        self._supervisors = [asyncio.create_task(child.supervise()) for child in self.children.values()]

    async def _start_child(self, name: str, port: int) -> None:
        child = self.children[name]
        await child.start()
        await _wait_grpc_serving(child, f"127.0.0.1:{port}")
        log.info("service ready", service=name, port=port)

    async def _start_gateway(self) -> None:
        child = self.children["gateway"]
        await child.start()
        url = f"{self.layout.gateway_scheme}://127.0.0.1:{self.layout.gateway.port}/healthz"
        deadline = time.monotonic() + 60
        # A liveness check over loopback: whether the gateway answers, not who it is.
        async with httpx.AsyncClient(timeout=2.0, verify=False) as client:  # noqa: S501
            while time.monotonic() < deadline:
                if not child.alive:
                    raise StackError("the gateway exited while starting; see its log above")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        log.info("service ready", service="gateway", port=self.layout.gateway.port)
                        return
                await asyncio.sleep(0.2)
        raise StackError("the gateway did not answer /healthz within 60 s")

    async def register_bundled(
        self, on_serving: Callable[[list[BundledLoad]], None], started: float | None = None
    ) -> list[BundledLoad]:
        """Registers the bundled models and loads them all at once, saying what serves and what is
        still coming; `on_serving` is called when the first is READY. Returns how each load ended."""
        registry = RegistryClient(f"127.0.0.1:{self.layout.registry.port}")
        loader = LoaderClient(f"127.0.0.1:{self.layout.loader.port}")
        try:
            models = [(await registry.register(spec, load=True))[0] for spec in bundled_models()]
            return await BundledLoads(loader, _say, on_serving).run(models, started)
        finally:
            await registry.close()
            await loader.close()

    async def stop(self) -> None:
        for task in self._supervisors:
            task.cancel()
        for name in ("gateway", "inference", "loader", "registry"):
            await self.children[name].stop()
        if self.triton is not None:
            await self.triton.stop()


async def _wait_grpc_serving(child: ChildProcess, address: str, limit_seconds: float = 60.0) -> None:
    deadline = time.monotonic() + limit_seconds
    async with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not child.alive:
                raise StackError(f"the {child.name} service exited while starting; see its log above")
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise StackError(f"the {child.name} service was not healthy within {limit_seconds:.0f} s")


def banner(layout: StackLayout, loads: list[BundledLoad], elapsed_seconds: float) -> str:
    """What the user needs once something serves: the URL, what serves, what is coming."""
    base = f"{layout.gateway_scheme}://localhost:{layout.gateway.port}/v1"
    now = time.monotonic()
    ready = [load for load in loads if load.ready_after is not None]
    coming = [load for load in loads if load.coming]
    embedder = next((load.name for load in loads if load.model.spec.task == Task.EMBEDDING), "MODEL")
    metrics = [f"    {name:<10} {url}" for name, url in layout.metrics_endpoints().items()]
    serving = ", ".join(f"{load.name} ({load.what})" for load in ready) or "no model yet (none is bundled or ready)"
    return "\n".join(
        [
            "",
            f"modelplane is serving, {elapsed_seconds:.0f} s after start.",
            f"  Base URL for Dify (OpenAI-API-compatible provider):  {base}",
            f"  Serving: {serving}",
            *[f"  Coming:  {load.describe(now)}" for load in coming],
            "  Try:",
            f"    curl -s {base}/embeddings -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{embedder}", "input": ["hello", "world"]}}\'',
            *_examples(base, [load.model.spec for load in loads]),
            "  Prometheus metrics:",
            *metrics,
            f"  State and logs live in {layout.home}. Press Ctrl-C to stop.",
            "",
        ]
    )


def _examples(base: str, specs: list[ModelSpec]) -> list[str]:
    """A request for the first bundled model of each task beyond embeddings: chat, speech, transcription."""
    chat = next((spec.name for spec in specs if spec.task == Task.GENERATION), None)
    tts = next((spec.name for spec in specs if spec.task == Task.TTS), None)
    stt = next((spec.name for spec in specs if spec.task == Task.SPEECH2TEXT), None)
    examples = []
    if chat:
        examples.append(
            f"    curl -sN {base}/chat/completions -H 'Content-Type: application/json' \\\n"
            f'      -d \'{{"model": "{chat}", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}\''
        )
    if tts:
        examples.append(
            f"    curl -s {base}/audio/speech -H 'Content-Type: application/json' \\\n"
            f'      -d \'{{"model": "{tts}", "input": "Hello from modelplane.", "voice": "alloy"}}\' -o hello.mp3'
        )
    if stt:
        examples.append(f"    curl -s {base}/audio/transcriptions -F file=@hello.mp3 -F model={stt}")
    return examples


def finished(loads: list[BundledLoad], elapsed_seconds: float) -> str:
    """The last line of a start: every bundled model READY, or which were not."""
    failed = [load for load in loads if load.failure]
    if not failed:
        names = ", ".join(load.name for load in loads) or "none are bundled"
        return f"modelplane is up. Every bundled model is ready ({names}), {elapsed_seconds:.0f} s after start."
    return (
        f"modelplane is up. Not every bundled model loaded ({elapsed_seconds:.0f} s after start): "
        + "; ".join(f"{load.name}: {load.failure}" for load in failed)
        + ". See `modelplane models events NAME`."
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_stack(*, load_bundled: bool = True) -> None:
    layout = StackLayout.from_environment()
    stack = Stack(layout, load_bundled=load_bundled)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(_start_and_load(stack, layout, load_bundled))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raise what went wrong while starting
            await stopped
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
    finally:
        log.info("stopping modelplane")
        await stack.stop()


async def _start_and_load(stack: Stack, layout: StackLayout, load_bundled: bool) -> None:
    started = time.monotonic()
    await stack.start()

    def serving(loads: list[BundledLoad]) -> None:
        _say(banner(layout, loads, time.monotonic() - started))

    loads: list[BundledLoad] = []
    if load_bundled:
        try:
            loads = await stack.register_bundled(serving, started)
        except ModelplaneError as error:
            log.error("the bundled models could not be registered; the stack keeps running", error=error.message)
    else:
        serving(loads)
    _say(finished(loads, time.monotonic() - started))
