"""A fleet on this machine for the fleet's integration tests: one registry (or several replicas on
one PostgreSQL database) and several nodes, each a real tritonserver and a real loader
(`modelplane serve loader`, as production runs them), every process on its own ports with its own
Triton repository and cache, and optionally an inference service that routes to them. A node can
be SIGKILLed (Triton and loader together) and started again, which `modelplane up` cannot do: it
restarts what dies; so can a registry replica be SIGKILLed. The helpers at the end poll the
registry for what the tests wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.grpc_errors import parse_rpc_error
from modelplane.common.settings import TritonSettings
from modelplane.common.types import WORKING_STATES, Model, ModelEvent, ModelSpec, ModelState, Task
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeState, Placement
from modelplane.registry.watch import NodeChange
from modelplane.triton.embedded import EmbeddedTriton
from tests.conftest import free_port
from tests.integration.services import _serve, grpc_serving

STARTUP_SECONDS = 120
LEASE_SECONDS = 10.0
# Longest a client of `EmbedTraffic` waits before trying again when told to retry later.
RETRY_WAIT_CAP_SECONDS = 2.0
T = TypeVar("T")


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def _wait(what: str, ready: object, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready():  # type: ignore[operator]
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (status {process.poll()}):\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path, size: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-size:]
    return "(no log)"


def _stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class FleetNode:
    node_id: str
    home: Path
    registry: str
    env: dict[str, str]
    triton: TritonSettings = field(init=False)
    loader_port: int = field(default_factory=free_port)
    loader_metrics_port: int = field(default_factory=free_port)
    triton_process: subprocess.Popen[bytes] | None = None
    loader_process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.triton = TritonSettings(
            grpc_address=f"127.0.0.1:{free_port()}",
            http_port=free_port(),
            metrics_port=free_port(),
            model_repository=self.home / "triton" / "models",
        )

    @property
    def loader(self) -> str:
        return f"127.0.0.1:{self.loader_port}"

    @property
    def loader_log(self) -> Path:
        return self.home / f"loader-{self.starts}.log"

    def loader_environment(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "MODELPLANE_HOME": str(self.home),
            "MODELPLANE_LOG_FORMAT": "json",
            "MODELPLANE_NODE_ID": self.node_id,
            "MODELPLANE_LOADER_FLEET": "true",
            "MODELPLANE_LOADER_HOST": "127.0.0.1",
            "MODELPLANE_LOADER_PORT": str(self.loader_port),
            "MODELPLANE_LOADER_METRICS_PORT": str(self.loader_metrics_port),
            "MODELPLANE_LOADER_REGISTRY_ADDRESS": self.registry,
            "MODELPLANE_LOADER_CACHE_DIR": str(self.home / "cache"),
            "MODELPLANE_LOADER_NODE_LEASE_SECONDS": str(LEASE_SECONDS),
            "MODELPLANE_LOADER_PRELOAD": "false",
            "MODELPLANE_LOADER_TRITON_METRICS_URL": f"http://127.0.0.1:{self.triton.metrics_port}/metrics",
            "MODELPLANE_TRITON_GRPC_ADDRESS": self.triton.grpc_address,
            "MODELPLANE_TRITON_HTTP_PORT": str(self.triton.http_port),
            "MODELPLANE_TRITON_METRICS_PORT": str(self.triton.metrics_port),
            "MODELPLANE_TRITON_MODEL_REPOSITORY": str(self.triton.model_repository),
            **self.env,
            **extra,
        }

    def start(self) -> None:
        """Starts this node's Triton, then its loader, and waits until the loader serves (it has
        registered the node by then)."""
        self.starts += 1
        self.home.mkdir(parents=True, exist_ok=True)
        self.triton.model_repository.mkdir(parents=True, exist_ok=True)
        triton = EmbeddedTriton(self.triton, workdir=self.home / "triton")
        triton_log = self.home / f"tritonserver-{self.starts}.log"
        with triton_log.open("wb") as output:
            # A group of its own, so that its python-backend stubs die with it (`kill`).
            self.triton_process = subprocess.Popen(
                triton.command(),
                env=triton.environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        live = f"http://127.0.0.1:{self.triton.http_port}/v2/health/live"

        def triton_live() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(live, timeout=1).status_code == 200
            return False

        _wait(f"tritonserver of {self.node_id}", triton_live, self.triton_process, triton_log)
        self.loader_process = self.spawn_loader(self.loader_log)
        _wait(f"loader of {self.node_id}", lambda: _serving(self.loader), self.loader_process, self.loader_log)

    def spawn_loader(self, log: Path, **extra: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            return subprocess.Popen(
                [sys.executable, "-m", "modelplane.cli", "serve", "loader"],
                env=self.loader_environment(**extra),
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL to Triton (its python-backend stubs with it) and the loader together, as a
        machine that loses power."""
        for process in (self.loader_process, self.triton_process):
            if process is not None and process.poll() is None:
                process.kill()
        if self.triton_process is not None:
            # Not yet waited for, Triton's pid still names its group: its stubs do not outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.triton_process.pid, signal.SIGKILL)
        for process in (self.loader_process, self.triton_process):
            if process is not None:
                process.wait()

    def stop(self) -> None:
        _stop(self.loader_process)
        _stop(self.triton_process)


@dataclass
class Replica:
    """One registry process of the fleet."""

    address: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Fleet:
    home: Path
    registry: str  # the gRPC target the nodes use: every replica's address
    nodes: dict[str, FleetNode]
    replicas: list[Replica]

    def log_tail(self) -> str:
        parts = [f"--- registry at {r.address}\n{_tail(r.log)}" for r in self.replicas]
        for node in self.nodes.values():
            parts.append(f"--- {node.node_id} loader\n{_tail(node.loader_log)}")
        if (self.home / "inference.log").exists():
            parts.append(f"--- inference\n{_tail(self.home / 'inference.log')}")
        return "\n".join(parts)


@contextlib.contextmanager
def running_fleet(
    home: Path,
    count: int,
    *,
    database_url: str = "",
    replicas: int = 1,
    registry_env: Mapping[str, str] | None = None,
    **node_env: str,
) -> Iterator[Fleet]:
    """`replicas` registry processes on one database (several need PostgreSQL's `database_url`),
    started one after the other, and `count` nodes (node-0 …), each node with `node_env` on top of
    its settings; `registry_env` on top of the registries' (their placer is off unless that turns
    it on). The nodes' registry address names every replica (gRPC's `ipv4:` target): a channel
    whose replica dies moves to the next."""
    home.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]
    registry = addresses[0] if replicas == 1 else "ipv4:" + ",".join(addresses)
    env = {
        **os.environ,
        "MODELPLANE_HOME": str(home),
        "MODELPLANE_LOG_FORMAT": "json",
        "MODELPLANE_REGISTRY_HOST": "127.0.0.1",
        "MODELPLANE_REGISTRY_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{home / 'registry.db'}",
        # Unless `registry_env` turns the placer on, the tests place copies themselves (SetPlacements),
        # as the placer would, so that what each node must hold is known (test_fleet.py).
        "MODELPLANE_REGISTRY_PLACER": "false",
        **(registry_env or {}),
    }
    nodes = {f"node-{i}": FleetNode(f"node-{i}", home / f"node-{i}", registry, dict(node_env)) for i in range(count)}
    started: list[Replica] = []
    try:
        for index, address in enumerate(addresses):
            log = home / ("registry.log" if index == 0 else f"registry-{index}.log")
            with log.open("wb") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "modelplane.cli", "serve", "registry"],
                    env={**env, "MODELPLANE_REGISTRY_PORT": address.rpartition(":")[2]},
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            started.append(Replica(address, process, log))
            _wait(f"registry at {address}", lambda a=address: _serving(a), process, log)
        for node in nodes.values():
            node.start()
        yield Fleet(home, registry, nodes, started)
    finally:
        for node in nodes.values():
            node.stop()
        for replica in started:
            _stop(replica.process)


@contextlib.contextmanager
def fleet_inference(fleet: Fleet) -> Iterator[str]:
    """An inference service that routes to the fleet's nodes, learning them and their copies from
    the registry's watch; yields its gRPC address. Nothing listens at its configured loader or
    Triton address: every request goes to a node, or waits for the placer's copy."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        "MODELPLANE_INFERENCE_HOST": "127.0.0.1",
        "MODELPLANE_INFERENCE_PORT": str(port),
        "MODELPLANE_INFERENCE_METRICS_PORT": str(free_port()),
        "MODELPLANE_INFERENCE_REGISTRY_ADDRESS": fleet.registry,
        "MODELPLANE_INFERENCE_LOADER_ADDRESS": f"127.0.0.1:{free_port()}",
        "MODELPLANE_TRITON_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    with _serve("inference", env, fleet.home / "inference.log", lambda: grpc_serving(address)):
        yield address


@dataclass(frozen=True)
class Outcome:
    """One request of `EmbedTraffic`: when it was sent, and how it ended."""

    model: str
    sent: float  # time.monotonic()
    answered: float  # time.monotonic()
    code: str  # "OK", or the gRPC status code's name
    reason: str = ""  # the error's google.rpc.ErrorInfo reason
    retry_after: float | None = None  # the error's google.rpc.RetryInfo delay


class EmbedTraffic:
    """Clients embedding one text at a time through an inference service, each on its own
    channel, until stopped; every request's outcome is kept. `clients` maps a model to how many
    clients send to it; each client sends at most `rate` requests/s (0: as fast as answers come).
    A client told UNAVAILABLE waits the retry delay it was given (at most 2 s), as one that
    follows the advice does."""

    def __init__(self, address: str, clients: Mapping[str, int], *, rate: float = 0.0, timeout: float = 60.0) -> None:
        self.address = address
        self.clients = dict(clients)
        self.rate = rate
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self) -> None:
        for model, count in self.clients.items():
            for index in range(count):
                self._tasks.append(asyncio.create_task(self._client(model, index), name=f"client-{model}-{index}"))

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> EmbedTraffic:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _client(self, model: str, index: int) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            count, next_send = 0, time.monotonic()
            while not self._stopping.is_set():
                request = pb.EmbedRequest(model=model, inputs=[pb.EmbedInput(text=f"client {index} sentence {count}")])
                sent, wait = time.monotonic(), 0.0
                try:
                    await stub.Embed(request, timeout=self.timeout)
                    self.outcomes.append(Outcome(model, sent, time.monotonic(), "OK"))
                except grpc.aio.AioRpcError as error:
                    remote = parse_rpc_error(error)
                    self.outcomes.append(
                        Outcome(
                            model, sent, time.monotonic(), remote.code.name, remote.reason, remote.retry_after_seconds
                        )
                    )
                    if remote.code == grpc.StatusCode.UNAVAILABLE:
                        wait = min(remote.retry_after_seconds or 0.0, RETRY_WAIT_CAP_SECONDS)
                count += 1
                if self.rate:
                    next_send = max(next_send + 1 / self.rate, time.monotonic() - 1)
                    wait = max(wait, next_send - time.monotonic())
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), wait)

    def of(self, model: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.model == model]

    def errors(self, model: str) -> list[Outcome]:
        return [o for o in self.of(model) if o.code != "OK"]

    async def served(self, models: list[str], *, since: float = 0.0) -> bool:
        """Whether each model has answered a request sent at `since` or later."""
        return all(any(o.code == "OK" and o.sent >= since for o in self.of(model)) for model in models)

    def tally(self, model: str) -> dict[str, int]:
        """Requests by outcome: OK, or the status code and reason of the errors."""
        counted: dict[str, int] = {}
        for o in self.of(model):
            key = o.code if o.code == "OK" else f"{o.code} {o.reason}".strip()
            counted[key] = counted.get(key, 0) + 1
        return counted


# Waiting for the registry to show something ------------------------------------------------------


async def until(check: Callable[[], Awaitable[T | None]], what: str, fleet: Fleet, limit: float = 240) -> T:
    """Polls `check` until it returns something; fails with the fleet's logs after `limit` s."""
    deadline = time.monotonic() + limit
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {limit:.0f} s\n{fleet.log_tail()}")
        await asyncio.sleep(0.25)


async def register(registry: RegistryClient, name: str, source: Path, **spec: object) -> None:
    """Registers an embedding model kept loaded (desired LOADED)."""
    await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(source), **spec), load=True)


async def all_ready(registry: RegistryClient, names: list[str]) -> list[Model] | None:
    models = [m for m in await registry.list_models() if m.name in names]
    return models if len(models) == len(names) and all(m.state == ModelState.READY for m in models) else None


def copies(placements: list[Placement]) -> dict[str, list[str]]:
    """The nodes each model is placed on, sorted."""
    where: dict[str, list[str]] = {}
    for placement in placements:
        where.setdefault(placement.model_name, []).append(placement.node_id)
    return {name: sorted(nodes) for name, nodes in sorted(where.items())}


async def node_in_state(registry: RegistryClient, node_id: str, state: NodeState) -> Node | None:
    found = [n for n in await registry.list_nodes() if n.node_id == node_id and n.state == state]
    return found[0] if found else None


def other_node(node_id: str) -> str:
    """The other node of a fleet of two."""
    return "node-1" if node_id == "node-0" else "node-0"


async def placed(registry: RegistryClient, name: str, count: int) -> list[Placement] | None:
    """The model's placements when there are `count` of them."""
    placements = await registry.list_placements([name])
    return placements if len(placements) == count else None


async def ready_copies(registry: RegistryClient, name: str, count: int) -> list[Placement] | None:
    """The model's placements when there are `count` and every one is READY."""
    placements = await placed(registry, name, count)
    ready = placements is not None and all(p.status.state == ModelState.READY for p in placements)
    return placements if ready else None


async def ready_on(registry: RegistryClient, name: str, node_id: str) -> Placement | None:
    found = [p for p in await registry.list_placements([name], [node_id]) if p.status.state == ModelState.READY]
    return found[0] if found else None


# A node killed under traffic ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """Where the seconds from a node's SIGKILL until its model is READY elsewhere went, each step
    in seconds after the kill, from the registry's own records: the node's lease, the watch's
    announcement of the node LOST, and the model's events (the placer's placement, the surviving
    loader's transitions)."""

    lease_expired: float  # the dead node's lease ran out (its last renewal + the lease)
    lost: float  # the registry announced the node LOST (received on its watch)
    placed: float  # the placer wrote the copy on the surviving node
    load_started: float  # the surviving node's loader began the load (its first transition)
    ready: float  # the surviving node's loader recorded the copy READY
    phases: tuple[tuple[str, float], ...]  # the load's states on the surviving node, in order, and seconds in each
    decision: str  # why the copy was placed there: a placer round's reason, or a waiting request's

    @property
    def load(self) -> float:
        """The replacement copy's load: from its loader starting it until READY."""
        return self.ready - self.load_started

    @property
    def control_plane(self) -> float:
        """What is neither the lease's wait nor the load: recording the node LOST, placing the copy
        again, and the surviving loader starting on it."""
        return self.load_started - self.lease_expired


@dataclass(frozen=True)
class Failover:
    """What SIGKILLing a node under traffic cost, measured in one run (`kill_under_traffic`)."""

    victim: str
    survivor: str
    load_seconds: float  # the lone copy's first load, on the victim: the survivor's cache is as cold
    lost_after: float  # seconds from the kill until the registry's reads say the victim is LOST
    ready_after: float  # seconds from the kill until the lone copy was seen READY on the survivor
    killed: float  # time.monotonic() of the kill
    ready_seen: float  # time.monotonic() when the lone copy was seen READY on the survivor
    traffic: EmbedTraffic
    timeline: Timeline

    @property
    def first_bound(self) -> float:
        """Lease + the load of the first copy (on the node that died, before any traffic)."""
        return LEASE_SECONDS + self.load_seconds

    @property
    def bound(self) -> float:
        """The issue's target: a lost node's models READY elsewhere within lease + load time,
        the load being that of the copy actually made (on the surviving node, under the traffic)."""
        return LEASE_SECONDS + self.timeline.load


async def kill_under_traffic(fleet: Fleet, inference: str, *, shared: str, solo: str, clients: int) -> Failover:
    """Waits for `shared` READY on both nodes of a fleet of two and `solo` READY on one; then
    `clients` clients (half on each model) embed through `inference` while the node holding
    solo's copy is SIGKILLed (Triton and loader together). Returns once solo's copy is READY on
    the other node and a request for it has been answered there."""
    async with RegistryClient(fleet.registry) as registry:
        await until(lambda: ready_copies(registry, shared, 2), f"{shared} READY on both nodes", fleet)
        [copy] = await until(lambda: ready_copies(registry, solo, 1), f"{solo} READY on one node", fleet)
        load_seconds = sum(d.duration.total_seconds() for d in copy.status.phase_durations)
        victim, survivor = copy.node_id, other_node(copy.node_id)
        half = clients // 2
        async with EmbedTraffic(inference, {shared: half, solo: clients - half}, timeout=30) as traffic:
            await until(lambda: traffic.served([shared, solo]), "both models served", fleet, limit=60)
            async with _announced_lost(registry, victim, solo) as lost_at:
                killed, killed_at = time.monotonic(), time.time()
                fleet.nodes[victim].kill()
                await until(lambda: node_in_state(registry, victim, NodeState.LOST), f"{victim} LOST", fleet, limit=60)
                lost_after = time.monotonic() - killed
                # Generous: the target three times over and a minute, on a machine the clients keep busy.
                limit = 3 * (LEASE_SECONDS + load_seconds) + 60
                await until(
                    lambda: ready_on(registry, solo, survivor), f"{solo} READY on {survivor}", fleet, limit=limit
                )
                ready_seen = time.monotonic()
                await until(lambda: traffic.served([solo], since=ready_seen), f"{solo} served again", fleet, limit=60)
            [dead] = await registry.list_nodes([victim])
            timeline = _timeline(dead, await registry.events(solo), survivor, killed_at, lost_at)
    return Failover(
        victim, survivor, load_seconds, lost_after, ready_seen - killed, killed, ready_seen, traffic, timeline
    )


@contextlib.asynccontextmanager
async def _announced_lost(registry: RegistryClient, node_id: str, model: str) -> AsyncIterator[list[float]]:
    """Follows the registry's watch of one node (and, as a watch follows models too, of one model);
    yields a list that receives the time (time.time()) the node was announced LOST. Subscribed
    before it yields: the watch's initial state has come."""
    lost: list[float] = []
    subscribed = asyncio.Event()

    async def follow() -> None:
        async for change in registry.watch_fleet(node_ids=[node_id], names=[model], include_placements=False):
            subscribed.set()
            if isinstance(change, NodeChange) and change.node.state == NodeState.LOST and not lost:
                lost.append(time.time())

    task = asyncio.create_task(follow(), name=f"watch-{node_id}")
    try:
        await asyncio.wait_for(subscribed.wait(), 30)
        yield lost
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _timeline(dead: Node, events: list[ModelEvent], survivor: str, killed_at: float, lost_at: list[float]) -> Timeline:
    """The failover's steps from the dead node's lease, the time it was announced LOST, and the
    model's events on the surviving node after the kill."""
    assert dead.lease_expire_time is not None and lost_at, (dead, lost_at)
    after = [
        (e, e.create_time.timestamp() - killed_at)
        for e in events
        if e.node_id == survivor and e.create_time is not None and e.create_time.timestamp() >= killed_at
    ]
    placed, decision = next((t, e.message) for e, t in after if e.message.startswith("placed on node"))
    steps = [(e.to_state, t) for e, t in after if t >= placed and e.to_state not in (ModelState.UNSPECIFIED,)]
    start = next(i for i, (state, _) in enumerate(steps) if state in WORKING_STATES)
    end = next(i for i, (state, _) in enumerate(steps) if state == ModelState.READY and i > start)
    phases = tuple((state.name, steps[i + 1][1] - t) for i, (state, t) in enumerate(steps[start:end], start))
    return Timeline(
        lease_expired=dead.lease_expire_time.timestamp() - killed_at,
        lost=lost_at[0] - killed_at,
        placed=placed,
        load_started=steps[start][1],
        ready=steps[end][1],
        phases=phases,
        decision=decision.partition("): ")[2] or decision,
    )
