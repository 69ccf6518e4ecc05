"""The registry's gRPC edge, against a real in-process server on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from modelplane.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from modelplane.common.types import ModelSpec, ModelState, PlacementPolicy, RequestCount, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeDevice, NodeState, PlacementTarget
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from tests.grpc_reflection_client import describe_methods, list_services


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[RegistryService]:
    # No placer: these tests write placements themselves (tests/registry/test_placer.py runs one).
    service = RegistryService(RegistrySettings(host="127.0.0.1", port=0, database_url=database_url, placer=False))
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def client(registry: RegistryService) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(f"127.0.0.1:{registry.port}") as client:
        yield client


async def test_register_and_read_back_over_grpc(client: RegistryClient) -> None:
    spec = ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/models/minilm", labels={"team": "search"})
    model, created = await client.register(spec, load=True)
    assert created
    fetched = await client.get_model("minilm")
    assert fetched.spec == model.spec and fetched.spec.labels == {"team": "search"}
    assert [m.name for m in await client.list_models(task=Task.EMBEDDING)] == ["minilm"]


async def test_errors_carry_code_reason_and_message(client: RegistryClient) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_model("ghost")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert "Model 'ghost' is not registered" in missing.value.message
    with pytest.raises(InvalidArgument) as invalid:
        await client.register(ModelSpec(name="Bad Name", task=Task.EMBEDDING, source_uri="/m"))
    assert invalid.value.reason == "INVALID_MODEL_SPEC" and "is not valid" in invalid.value.message


async def test_watch_streams_transitions(client: RegistryClient) -> None:
    model, _ = await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"))
    seen: list[ModelState] = []

    async def follow() -> None:
        async for change in client.watch(names=["minilm"], include_initial=True):
            seen.append(change.model.state)
            if change.model.state == ModelState.FETCHING:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await client.transition(model, ModelState.FETCHING, "fetching")
    await asyncio.wait_for(follower, timeout=5)
    assert seen == [ModelState.REGISTERED, ModelState.FETCHING]


async def test_reflection_lists_and_describes_the_service(registry: RegistryService) -> None:
    address = f"127.0.0.1:{registry.port}"
    services = await asyncio.to_thread(list_services, address)
    assert "modelplane.registry.v1.RegistryService" in services
    assert "grpc.health.v1.Health" in services
    methods = await asyncio.to_thread(describe_methods, address, "modelplane.registry.v1.RegistryService")
    assert methods["RegisterModel"][:2] == (
        "modelplane.registry.v1.RegisterModelRequest",
        "modelplane.registry.v1.RegisterModelResponse",
    )
    assert methods["WatchModels"][2] is True


async def test_request_statistics_round_trip_with_every_rate(client: RegistryClient) -> None:
    now = datetime.now(UTC)
    await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"))
    await client.record_requests([RequestCount(model_name="minilm", count=60, last_request_time=now, cold_starts=2)])
    [stats] = await client.statistics(["minilm"])
    assert (stats.model_name, stats.total_requests, stats.cold_starts) == ("minilm", 60, 2)
    # One batch of 60 adds 60/tau to each rate: the 1-minute rate reacts five times more than the 5-minute one.
    assert stats.rate_1m == pytest.approx(1.0, rel=0.05)
    assert stats.rate_5m == pytest.approx(0.2, rel=0.05)
    assert stats.rate_1h == pytest.approx(60 / 3600, rel=0.05)
    assert stats.hour_of_day_counts[now.hour] == 60
    assert stats.last_request_time is not None and abs((stats.last_request_time - now).total_seconds()) < 0.001
    assert await client.statistics(["ghost"]) == []


def _node(holder: str, **fields: object) -> Node:
    values: dict[str, object] = {"loader_address": "10.0.0.5:50052", "triton_address": "10.0.0.5:8001", **fields}
    return Node(node_id="node-0", holder=holder, **values)  # type: ignore[arg-type]


async def test_a_second_process_claiming_a_live_node_id_gets_already_exists(client: RegistryClient) -> None:
    await client.register_node(_node("loader@a pid 1 aa"), lease_duration=timedelta(seconds=30))
    with pytest.raises(AlreadyExists) as refused:
        await client.register_node(_node("loader@b pid 2 bb"))
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert refused.value.reason == "NODE_ID_IN_USE"
    assert refused.value.message.startswith("Node id 'node-0' is in use: held by loader@a pid 1 aa")
    assert refused.value.metadata["holder"] == "loader@a pid 1 aa"
    assert 25 < refused.value.retry_after_seconds <= 30  # type: ignore[operator]


async def test_a_process_replacing_a_crashed_one_waits_for_its_lease_to_lapse(client: RegistryClient) -> None:
    await client.register_node(_node("loader@a pid 1 aa"), lease_duration=timedelta(seconds=1))
    # The first process died without a word: the replacement waits out its lease, then takes over.
    replacement = await client.register_node(_node("loader@a pid 7 cc"), wait_seconds=10)
    assert (replacement.holder, replacement.incarnation, replacement.state) == ("loader@a pid 7 cc", 2, NodeState.LIVE)


async def test_a_node_its_placements_and_the_derived_model_over_grpc(client: RegistryClient) -> None:
    devices = [NodeDevice(device="gpu:0", product="NVIDIA L4", capacity_bytes=20 << 30, used_bytes=1 << 30)]
    node = await client.register_node(
        _node("loader@a pid 1 aa", labels={"gpu": "l4"}, devices=devices), lease_duration=timedelta(seconds=30)
    )
    assert node.lease_duration == timedelta(seconds=30) and node.devices == devices
    [listed] = await client.list_nodes(states=[NodeState.LIVE])
    assert listed == node
    await client.register(
        ModelSpec(
            name="minilm",
            task=Task.EMBEDDING,
            source_uri="/m",
            placement=PlacementPolicy(min_copies=1, max_copies=3, node_selector={"gpu": "l4"}),
        ),
        load=True,
    )
    assert (await client.get_model("minilm")).spec.placement == PlacementPolicy(
        min_copies=1, max_copies=3, node_selector={"gpu": "l4"}
    )
    [placement], _ = await client.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    for state in (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING):
        placement, model = await client.transition_placement(placement, node.incarnation, state)
    placement, model = await client.transition_placement(
        placement, node.incarnation, ModelState.READY, "loaded", footprint_bytes=1 << 28, observed_generation=1
    )
    assert (placement.status.state, placement.status.observed_generation) == (ModelState.READY, 1)
    assert model.state == ModelState.READY and model.status.footprint_bytes == 1 << 28
    assert await client.list_placements(node_ids=["node-0"]) == [placement]
    renewed = await client.renew_node_lease("node-0", node.incarnation)
    assert renewed.lease_expire_time > node.lease_expire_time  # type: ignore[operator]
    drained = await client.drain_node("node-0")
    assert drained.state == NodeState.DRAINING
    assert await client.list_nodes(states=[NodeState.LIVE]) == []
    with pytest.raises(FailedPrecondition) as lost:
        await client.renew_node_lease("node-0", node.incarnation + 1)
    assert lost.value.reason == "NODE_LEASE_LOST"
    assert "no longer holds it: stop serving its copies and register again" in lost.value.message
    # A removal carries its reason over the wire into the model's events.
    why = {("minilm", "node-0"): "moved: node-0 is draining"}
    _, [removed] = await client.set_placements([], [("minilm", "node-0")], reasons=why)
    assert removed.key == ("minilm", "node-0")
    assert (await client.events("minilm"))[-1].message == "removed from node node-0: moved: node-0 is draining"


async def test_reflection_describes_the_fleet_rpcs(registry: RegistryService) -> None:
    methods = await asyncio.to_thread(
        describe_methods, f"127.0.0.1:{registry.port}", "modelplane.registry.v1.RegistryService"
    )
    for name in (
        "RegisterNode",
        "RenewNodeLease",
        "DrainNode",
        "DeleteNode",
        "ListNodes",
        "ListPlacements",
        "SetPlacements",
        "TransitionPlacement",
    ):
        assert methods[name][:2] == (f"modelplane.registry.v1.{name}Request", f"modelplane.registry.v1.{name}Response")
