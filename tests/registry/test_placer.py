"""The placer loop and EnsurePlacement, through the real registry gRPC server.

Nodes register and renew their leases over gRPC as loaders do (no loader runs: what a node's
loader would do with its placements is not the placer's business). Every test runs on SQLite and
on a real PostgreSQL server; the leadership test runs two replicas on one PostgreSQL database,
one of them a separate process that is SIGKILLed. About 100 s in all here, under heavy contention.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from modelplane.common.errors import NotFound, ResourceExhausted
from modelplane.common.types import (
    DesiredState,
    ModelSpec,
    PlacementPolicy,
    Priority,
    RequestCount,
    RuntimeHints,
    RuntimeTarget,
    Task,
)
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import PLACER_LEASE, Node, NodeDevice, NodeState, Placement
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import NodeChange
from tests.postgres import PostgresServer

GIB = 2**30
FAST = {"placer_interval_seconds": 0.2, "placer_debounce_seconds": 0.05, "placer_lease_seconds": 1.0}


def _settings(database_url: str, **overrides: object) -> RegistrySettings:
    values = {"host": "127.0.0.1", "port": 0, "database_url": database_url, "node_sweep_interval_seconds": 0.2}
    return RegistrySettings(**(values | FAST | overrides))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _registry(database_url: str, **overrides: object) -> AsyncIterator[tuple[RegistryService, RegistryClient]]:
    service = RegistryService(_settings(database_url, **overrides))
    await service.start()
    try:
        async with RegistryClient(f"127.0.0.1:{service.port}") as client:
            yield service, client
    finally:
        await service.stop()


async def _eventually(check: Callable[[], object], what: str, within: float = 30.0) -> Any:
    """Polls until `check` returns (or its awaitable gives) something truthy; the timeout only
    ends a test that would otherwise hang."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {within:g} s (last: {result!r})")
        await asyncio.sleep(0.1)


class Fleet:
    """Nodes as their loaders would register them, renewed in the background until `lose`."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.incarnations: dict[str, int] = {}
        self.renewing: dict[str, asyncio.Task[None]] = {}

    async def add(
        self, node_id: str, cpu_gib: float = 4, *, labels: dict[str, str] | None = None, lease: float = 5.0
    ) -> Node:
        node = await self.client.register_node(
            Node(
                node_id=node_id,
                loader_address="127.0.0.1:28052",
                triton_address="127.0.0.1:28001",
                holder=f"loader@test {node_id}",
                labels=labels or {},
                devices=[NodeDevice(device="cpu", capacity_bytes=int(cpu_gib * GIB), total_bytes=int(cpu_gib * GIB))],
            ),
            lease_duration=timedelta(seconds=lease),
        )
        self.incarnations[node_id] = node.incarnation
        self.renewing[node_id] = asyncio.create_task(self._renew(node_id, lease / 4))
        return node

    async def _renew(self, node_id: str, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.client.renew_node_lease(node_id, self.incarnations[node_id])

    async def lose(self, node_id: str) -> None:
        """The node's loader and Triton die: nothing renews its lease any more."""
        task = self.renewing.pop(node_id)
        task.cancel()
        # At teardown the registry may have gone first, closing the channel under a renewal.
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.UsageError):
            await task

    async def close(self) -> None:
        for node_id in list(self.renewing):
            await self.lose(node_id)


@pytest.fixture
async def fleet_of() -> AsyncIterator[Callable[[RegistryClient], Fleet]]:
    made: list[Fleet] = []

    def make(client: RegistryClient) -> Fleet:
        made.append(Fleet(client))
        return made[-1]

    yield make
    for fleet in made:
        await fleet.close()


def _spec(name: str, gib: float = 1.5, **fields: object) -> ModelSpec:
    return ModelSpec(
        name=name, task=Task.EMBEDDING, source_uri=f"/m/{name}", memory_estimate_bytes=int(gib * GIB), **fields
    )  # type: ignore[arg-type]


def _where(placements: list[Placement]) -> dict[str, list[str]]:
    by_node: dict[str, list[str]] = {}
    for p in placements:
        by_node.setdefault(p.node_id, []).append(p.model_name)
    return by_node


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


# The loop ---------------------------------------------------------------------------------------


async def test_the_loop_places_models_on_registered_nodes_within_their_budgets(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    async with _registry(database_url) as (service, client):
        await _eventually(lambda: service.placer.leader, "the only replica leads")  # type: ignore[union-attr]
        fleet = fleet_of(client)
        # Two nodes whose budgets (4 GiB) fit two of the 1.5 GiB models each; four kept loaded.
        await fleet.add("node-0")
        await fleet.add("node-1")
        for name in ("m1", "m2", "m3", "m4"):
            await client.register(_spec(name), load=True)

        async def four_placed() -> list[Placement]:
            placements = await client.list_placements()
            return placements if len(placements) == 4 else []

        placements = await _eventually(four_placed, "four placements")
        by_node = _where(placements)
        assert sorted(by_node) == ["node-0", "node-1"]
        assert [len(models) for models in by_node.values()] == [2, 2]  # spread, and never over a budget
        assert all(p.generation == 1 for p in placements)
        assert all(p.decision.startswith("copy 1: the operator keeps it loaded") for p in placements)

        # A fifth model kept loaded fits nowhere (both budgets full of models kept loaded): unplaced.
        await client.register(_spec("m5"), load=True)
        await _eventually(lambda: _gauge("modelplane_placer_unplaced_models") == 1, "one unplaced")
        assert _gauge("modelplane_placer_is_leader") == 1
        assert len(await client.list_placements()) == 4  # a model kept loaded is never displaced for another

        # Its operator lets it go: desired UNLOADED and no requests, it wants no copy; nothing pending.
        await client.set_desired_state("m5", DesiredState.UNLOADED)
        await _eventually(lambda: _gauge("modelplane_placer_unplaced_models") == 0, "none unplaced")


async def test_a_lost_nodes_placements_are_removed_and_placed_on_a_live_node(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    async with _registry(database_url) as (_service, client):
        fleet = fleet_of(client)
        await fleet.add("node-0", lease=2.0)
        await client.register(_spec("kept"), load=True)
        [first] = await _eventually(client.list_placements, "the model placed")
        assert first.node_id == "node-0"
        await fleet.add("node-1")
        await fleet.lose("node-0")  # killed: its lease (2 s) lapses

        async def moved() -> list[Placement]:
            placements = await client.list_placements()
            return placements if [p.node_id for p in placements] == ["node-1"] else []

        [placement] = await _eventually(moved, "the copy moved to node-1")
        assert "node node-0 is lost" not in placement.decision  # a new placement, with its own reason
        events = await client.events(name="kept")
        # The model's history says why, as the placer decided it, not only that the placer did it.
        removed = [e.message for e in events if e.node_id == "node-0" and "removed from node node-0" in e.message]
        assert removed == [
            "removed from node node-0: node node-0 is lost (its lease expired); the copy is placed again elsewhere"
        ]


async def test_a_node_is_lost_as_its_lease_lapses_and_its_copy_placed_again_at_once(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    """Neither the sweep nor the placer waits on a timer when a node dies: with a sweep interval, a
    placer interval and a placer debounce of a minute each, the node is announced LOST when its 5 s
    lease lapses, and its copy is placed on the other node right after."""
    minute = {
        "node_sweep_interval_seconds": 60.0,
        "placer_interval_seconds": 60.0,
        "placer_debounce_seconds": 60.0,
        "placer_lease_seconds": 180.0,
    }
    async with _registry(database_url, **minute) as (service, client):
        placer = service.placer
        assert placer is not None
        await _eventually(lambda: placer.leader, "the only replica leads")
        fleet = fleet_of(client)
        await fleet.add("node-0")
        await fleet.add("node-1")
        await client.register(_spec("kept", placement=PlacementPolicy(max_copies=1)), load=True)
        await placer.round()  # the first placement, without waiting for the loop's debounce
        [first] = await client.list_placements(["kept"])
        survivor = "node-1" if first.node_id == "node-0" else "node-0"
        announced: list[tuple[Node, datetime]] = []
        watching = asyncio.Event()

        async def follow() -> None:
            async for change in client.watch_fleet(node_ids=[first.node_id], names=["kept"], include_placements=False):
                watching.set()
                if isinstance(change, NodeChange) and change.node.state == NodeState.LOST:
                    announced.append((change.node, datetime.now(UTC)))
                    return

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(watching.wait(), 30)
        await fleet.lose(first.node_id)
        # A minute's sweep interval would announce it a minute after the registry started.
        await asyncio.wait_for(follower, 20)
        [(lost, heard)] = announced
        assert lost.lease_expire_time is not None and lost.lease_expire_time <= heard

        async def moved() -> list[Placement]:
            placements = await client.list_placements(["kept"])
            return placements if [p.node_id for p in placements] == [survivor] else []

        # A minute's debounce would place it a minute after the node was lost.
        await _eventually(moved, f"the copy placed on {survivor}", within=20)


async def _copies(client: RegistryClient, name: str, count: int, what: str) -> list[Placement]:
    """The model's placements, once there are `count` of them."""

    async def enough() -> list[Placement]:
        placements = await client.list_placements([name])
        return placements if len(placements) == count else []

    return await _eventually(enough, what)


async def test_a_hot_model_gets_a_copy_per_node_its_rate_needs(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    async with _registry(database_url) as (_service, client):
        fleet = fleet_of(client)
        for node_id in ("node-0", "node-1", "node-2"):
            await fleet.add(node_id)
        await client.register(_spec("hot"))
        # The inference service reports a burst: about 47 requests/s forecast, 20 per copy by default.
        now = datetime.now(UTC)
        await client.record_requests([RequestCount(model_name="hot", count=5000, last_request_time=now)])

        placements = await _copies(client, "hot", 3, "three copies of the hot model")
        assert sorted(p.node_id for p in placements) == ["node-0", "node-1", "node-2"]
        assert all("3 copies of 20 requests/s each serve it" in p.decision for p in placements)


async def test_what_one_copy_serves_and_how_young_a_copy_stays_are_the_operators_settings(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    """A copy on a CPU node serves far fewer requests than 20/s; the operator says how many."""
    settings = {"placer_copy_capacity_rps": 2.0, "placer_min_copy_age_seconds": 5.0}
    async with _registry(database_url, **settings) as (service, client):
        fleet = fleet_of(client)
        for node_id in ("node-0", "node-1", "node-2"):
            await fleet.add(node_id)
        await client.register(_spec("warm"))
        # About 4.7 requests/s forecast: one copy at the default 20 per copy, three at 2 per copy.
        now = datetime.now(UTC)
        await client.record_requests([RequestCount(model_name="warm", count=500, last_request_time=now)])

        placements = await _copies(client, "warm", 3, "three copies of a model at 2 requests/s per copy")
        assert all("3 copies of 2 requests/s each serve it" in p.decision for p in placements)
        assert service.placer is not None and service.placer.policy.min_copy_age_seconds == 5.0


# Leadership -------------------------------------------------------------------------------------


async def test_two_replicas_one_places_and_the_other_takes_over_when_it_is_killed(
    postgres: PostgresServer, tmp_path: Path, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    database = postgres.url(await postgres.create_database())
    store = await RegistryStore.open(database)  # migrated before either replica starts
    lease = 2.0
    env = os.environ | {
        "MODELPLANE_HOME": str(tmp_path),
        "MODELPLANE_REGISTRY_PORT": "0",
        "MODELPLANE_REGISTRY_METRICS_PORT": "0",
        "MODELPLANE_REGISTRY_DATABASE_URL": database,
        "MODELPLANE_REGISTRY_PLACER_INTERVAL_SECONDS": "0.5",
        "MODELPLANE_REGISTRY_PLACER_LEASE_SECONDS": str(lease),
    }
    cli = Path(sys.executable).with_name("modelplane")
    first = await asyncio.create_subprocess_exec(
        str(cli), "serve", "registry", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:

        async def held_by_first() -> bool:
            held = await store.leases.get(PLACER_LEASE)
            return held is not None and f"pid {first.pid} " in held.holder

        await _eventually(held_by_first, "the first replica leads", within=60)
        async with _registry(database, placer_interval_seconds=0.5, placer_lease_seconds=lease) as (second, client):
            fleet = fleet_of(client)
            await fleet.add("node-0", lease=5.0)
            await client.register(_spec("before"), load=True)
            await _eventually(client.list_placements, "the first replica placed the model")
            assert not second.placer.leader  # type: ignore[union-attr]

            first.send_signal(signal.SIGKILL)  # no release: its lease must lapse
            await first.wait()
            killed = time.monotonic()
            await _eventually(lambda: second.placer.leader, "the second replica leads")  # type: ignore[union-attr]
            took_over = time.monotonic() - killed
            print(f"takeover {took_over:.2f} s after SIGKILL (lease {lease:g} s, interval 0.5 s)")
            assert took_over <= lease + 0.5 + 10  # bounded by a lease and a round; slack for a loaded machine

            await client.register(_spec("after"), load=True)

            async def both() -> bool:
                return sorted(p.model_name for p in await client.list_placements()) == ["after", "before"]

            await _eventually(both, "the second replica placed the new model")
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
        await store.close()


# On demand ----------------------------------------------------------------------------------------


async def test_ensure_placement_places_a_model_once_and_returns_the_node(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    # No loop: what EnsurePlacement writes is its own doing.
    async with _registry(database_url, placer=False) as (_service, client):
        fleet = fleet_of(client)
        await fleet.add("node-0", lease=30)
        await fleet.add("node-1", cpu_gib=8, lease=30)
        await client.register(_spec("asked"))
        placements, node_id = await client.ensure_placement("asked", request_id="req-1")
        assert node_id == "node-1"  # spread: the most memory left
        assert [(p.model_name, p.node_id, p.generation) for p in placements] == [("asked", "node-1", 1)]
        assert "a request waits for it" in placements[0].decision
        # Asked again while the copy is on its way: the same node, nothing new.
        assert await client.ensure_placement("asked") == (placements, "node-1")
        events = await client.events(name="asked")
        assert [e.node_id for e in events if "placed on node" in e.message] == ["node-1"]

        with pytest.raises(NotFound) as unknown:
            await client.ensure_placement("ghost")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert unknown.value.message.startswith("Model 'ghost' is not registered")


async def test_ensure_placement_refuses_with_why_no_node_fits(
    database_url: str, fleet_of: Callable[[RegistryClient], Fleet]
) -> None:
    async with _registry(database_url, placer=False) as (_service, client):
        fleet = fleet_of(client)
        await fleet.add("node-0", labels={"zone": "a"}, lease=30)
        gpu = RuntimeHints(target=RuntimeTarget.ONNXRUNTIME)
        await client.register(_spec("on-gpu", runtime_hints=gpu))
        await client.register(_spec("huge", 10))
        await client.register(_spec("picky", placement=PlacementPolicy(node_selector={"gpu": "a100"})))
        await client.register(_spec("kept", 3, priority=Priority.HIGH), load=True)
        await client.register(_spec("late", 2))
        await client.ensure_placement("kept")  # 3 of node-0's 4 GiB, of a higher class than late
        expected = {
            "on-gpu": "No node can take model 'on-gpu' now: no live node has a gpu device (they have: cpu).",
            "huge": (
                "No node can take model 'huge' now: the largest cpu budget of a matching live node is 4.0 GiB "
                "(node-0), below its footprint 10.0 GiB."
            ),
            "picky": (
                "No node can take model 'picky' now: no live node with a cpu device carries the labels gpu=a100 "
                "(the model's node_selector)."
            ),
            "late": (
                "No node can take model 'late' now: the largest free cpu memory of a matching node is 1.0 GiB "
                "(node-0), below its footprint 2.0 GiB, and a request waits for it: every copy that could make "
                "room is pinned, of a higher class, or not colder by a factor of 1.5."
            ),
        }
        for name, message in expected.items():
            with pytest.raises(ResourceExhausted) as refused:
                await client.ensure_placement(name)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.reason == "NO_NODE_FITS"
            assert refused.value.message == message
            # Only a model that room may come for is worth asking again soon.
            assert (refused.value.retry_after_seconds is not None) == (name == "late")
        assert [p.model_name for p in await client.list_placements()] == ["kept"]
