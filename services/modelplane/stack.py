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
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import psutil
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.bundled import bundled_models
from modelplane.bundled_speech import voice_notice
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
from modelplane.registry.fleet import Node
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
    service: str = ""  # the service it runs (`modelplane serve <service>`); its name when empty
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
            self.service or self.name,
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
    # The fleet's nodes (MODELPLANE_NODES, 1 by default): node-0 listens where the settings say,
    # each further one on ports of its own, with its own Triton repository and cache.
    nodes: tuple[NodeLayout, ...] = ()

    @classmethod
    def from_environment(cls) -> StackLayout:
        def with_metrics(settings: ServerSettingsT, service: str) -> ServerSettingsT:
            if settings.metrics_port:
                return settings
            return settings.model_copy(update={"metrics_port": DEFAULT_METRICS_PORTS[service]})

        home = modelplane_home()
        loader = with_metrics(LoaderSettings(), "loader")
        triton = TritonSettings()
        return cls(
            home=home,
            registry=with_metrics(RegistrySettings(), "registry"),
            loader=loader,
            inference=with_metrics(InferenceSettings(), "inference"),
            gateway=GatewaySettings(),
            triton=triton,
            nodes=NodeLayout.fleet(_node_count(), home, loader, triton),
        )

    @property
    def fleet(self) -> bool:
        return len(self.nodes) > 1

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
        for node in self.nodes[1:]:
            endpoints[f"loader {node.node_id}"] = f"http://127.0.0.1:{node.loader.metrics_port}/metrics"
            if self.triton.embedded:
                endpoints[f"triton {node.node_id}"] = f"http://127.0.0.1:{node.triton.metrics_port}/metrics"
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
        if self.fleet:
            env.update(self.nodes[0].environment())
        return env


@dataclass(frozen=True)
class NodeLayout:
    """One node of the fleet `up` runs on this machine: its Triton and its loader."""

    node_id: str
    loader: LoaderSettings
    triton: TritonSettings
    home: Path

    @classmethod
    def fleet(cls, count: int, home: Path, loader: LoaderSettings, triton: TritonSettings) -> tuple[NodeLayout, ...]:
        """node-0 where the settings say; node-1… on free ports, each under home/nodes/<id>.
        Unless a budget is configured, the nodes share this machine's memory evenly."""
        if count > 1 and not loader.host_memory_bytes:
            loader = loader.model_copy(update={"host_memory_bytes": psutil.virtual_memory().total // count})
        nodes = [cls(loader.node_id if count == 1 else "node-0", loader, triton, home)]
        for index in range(1, count):
            node_home = home / "nodes" / f"node-{index}"
            grpc_port, http_port, metrics_port, loader_port, loader_metrics = (_free_port() for _ in range(5))
            nodes.append(
                cls(
                    f"node-{index}",
                    loader.model_copy(
                        update={
                            "port": loader_port,
                            "metrics_port": loader_metrics,
                            "cache_dir": node_home / "cache",
                        }
                    ),
                    triton.model_copy(
                        update={
                            "grpc_address": f"127.0.0.1:{grpc_port}",
                            "http_port": http_port,
                            "metrics_port": metrics_port,
                            "model_repository": node_home / "triton" / "models",
                        }
                    ),
                    node_home,
                )
            )
        return tuple(nodes)

    @property
    def loader_address(self) -> str:
        return f"127.0.0.1:{self.loader.port}"

    def environment(self) -> dict[str, str]:
        """What this node's loader is told on top of the stack's environment."""
        return {
            "MODELPLANE_NODE_ID": self.node_id,
            "MODELPLANE_LOADER_FLEET": "true",
            "MODELPLANE_LOADER_ADVERTISE_HOST": "127.0.0.1",
            "MODELPLANE_LOADER_PORT": str(self.loader.port),
            "MODELPLANE_LOADER_METRICS_PORT": str(self.loader.metrics_port),
            "MODELPLANE_LOADER_CACHE_DIR": str(self.loader.cache_dir),
            "MODELPLANE_LOADER_HOST_MEMORY_BYTES": str(self.loader.host_memory_bytes),
            "MODELPLANE_LOADER_TRITON_METRICS_URL": f"http://127.0.0.1:{self.triton.metrics_port}/metrics",
            "MODELPLANE_TRITON_GRPC_ADDRESS": self.triton.grpc_address,
            "MODELPLANE_TRITON_HTTP_PORT": str(self.triton.http_port),
            "MODELPLANE_TRITON_METRICS_PORT": str(self.triton.metrics_port),
            "MODELPLANE_TRITON_MODEL_REPOSITORY": str(self.triton.model_repository),
        }


def _node_count() -> int:
    text = os.environ.get("MODELPLANE_NODES", "1").strip() or "1"
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise StackError(f"MODELPLANE_NODES={text!r} is not a number of nodes from 1 to 16 (1 runs one node).")
    return int(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    def __init__(self, layout: StackLayout, *, load_bundled: bool = True) -> None:
        self.layout = layout
        self.load_bundled = load_bundled
        env = layout.environment()
        embedded = layout.triton.embedded
        self.triton = EmbeddedTriton(layout.triton, workdir=layout.home / "triton") if embedded else None
        self.children = {name: ChildProcess(name, env) for name in ("registry", "loader", "inference", "gateway")}
        # Further nodes of a fleet: a Triton and a loader each (node-0's are the ones above).
        self.node_tritons = [
            EmbeddedTriton(node.triton, workdir=node.home / "triton") for node in layout.nodes[1:] if embedded
        ]
        self.node_loaders = {
            node.node_id: ChildProcess(f"loader {node.node_id}", {**env, **node.environment()}, service="loader")
            for node in layout.nodes[1:]
        }
        self._supervisors: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(t.start() for t in ([self.triton] if self.triton else []) + self.node_tritons))
        await self._start_child("registry", self.layout.registry.port)
        await asyncio.gather(
            self._start_child("loader", self.layout.loader.port),
            self._start_child("inference", self.layout.inference.port),
            *(self._start_node_loader(node.node_id, node.loader.port) for node in self.layout.nodes[1:]),
        )
        await self._start_gateway()
        children = [*self.children.values(), *self.node_loaders.values()]
        self._supervisors = [asyncio.create_task(child.supervise()) for child in children]

    async def _start_node_loader(self, node_id: str, port: int) -> None:
        child = self.node_loaders[node_id]
        await child.start()
        await _wait_grpc_serving(child, f"127.0.0.1:{port}")
        log.info("service ready", service="loader", node=node_id, port=port)

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
        still coming; `on_serving` is called when the first is READY. Returns how each load ended.
        On a fleet the placer decides where each runs: they are registered wanted LOADED and
        followed in the registry until READY on some node."""
        registry = RegistryClient(f"127.0.0.1:{self.layout.registry.port}")
        loader = LoaderClient(f"127.0.0.1:{self.layout.loader.port}")
        try:
            models = [(await registry.register(spec, load=True))[0] for spec in bundled_models()]
            follow = registry if self.layout.fleet else None
            return await BundledLoads(loader, _say, on_serving, registry=follow).run(models, started)
        finally:
            await registry.close()
            await loader.close()

    async def nodes(self) -> list[Node]:
        registry = RegistryClient(f"127.0.0.1:{self.layout.registry.port}")
        try:
            return await registry.list_nodes()
        finally:
            await registry.close()

    async def stop(self) -> None:
        for task in self._supervisors:
            task.cancel()
        for name in ("gateway", "inference"):
            await self.children[name].stop()
        await asyncio.gather(self.children["loader"].stop(), *(c.stop() for c in self.node_loaders.values()))
        await self.children["registry"].stop()
        await asyncio.gather(*(t.stop() for t in ([self.triton] if self.triton else []) + self.node_tritons))


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


def banner(
    layout: StackLayout, loads: list[BundledLoad], elapsed_seconds: float, nodes: list[Node] | None = None
) -> str:
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
            voice_notice(),
            *_node_lines(nodes or []),
            "  Prometheus metrics:",
            *metrics,
            f"  State and logs live in {layout.home}. Press Ctrl-C to stop.",
            "",
        ]
    )


def _node_lines(nodes: list[Node]) -> list[str]:
    if not nodes:
        return []
    lines = [f"  Nodes ({len(nodes)}; watch placement and failover: modelplane nodes ls, modelplane models ls):"]
    for node in sorted(nodes, key=lambda n: n.node_id):
        budget = ", ".join(f"{d.device} {d.capacity_bytes / 2**30:.1f} GiB" for d in node.devices) or "no budget yet"
        lines.append(
            f"    {node.node_id:<8} {node.state.name:<8} loader {node.loader_address}  Triton {node.triton_address}  "
            f"({budget})"
        )
    return lines


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
    nodes: list[Node] = []
    try:
        nodes = await stack.nodes()
    except ModelplaneError as error:
        log.warning("nodes not listed", error=error.message)

    def serving(loads: list[BundledLoad]) -> None:
        _say(banner(layout, loads, time.monotonic() - started, nodes))

    loads: list[BundledLoad] = []
    if load_bundled:
        try:
            loads = await stack.register_bundled(serving, started)
        except ModelplaneError as error:
            log.error("the bundled models could not be registered; the stack keeps running", error=error.message)
    else:
        serving(loads)
    _say(finished(loads, time.monotonic() - started))
