"""The on-demand path in isolation: a request for a model with no READY copy asks for one and waits.

The registry and the loader stand in as recorders (the real ones are in tests/integration): what
is checked is which of them is asked, when, and what the waiting request gets.
"""

from __future__ import annotations

import asyncio

import pytest

from modelplane.common.errors import ResourceExhausted
from modelplane.common.types import Model, ModelSpec, ModelState, ModelStatus, ServingProfile, Task
from modelplane.inference.catalog import FleetOnDemand, ModelCatalog
from modelplane.inference.errors import ModelLoading
from modelplane.inference.routing import DEFAULT_NODE_ID, RoutingTable
from modelplane.registry.fleet import Node, NodeState, Placement, PlacementStatus
from modelplane.registry.watch import ChangeType, NodeChange, PlacementChange


def _model(state: ModelState) -> Model:
    profile = ServingProfile(triton_model_name="m")
    return Model(spec=ModelSpec(name="m", task=Task.EMBEDDING), status=ModelStatus(state=state, profile=profile))


def _placement(state: ModelState) -> Placement:
    return Placement(
        model_name="m",
        node_id="node-a",
        version=1,
        generation=1,
        status=PlacementStatus(state=state, incarnation=1, version=1),
    )


class Registry:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.ensured: list[tuple[str, str]] = []
        self.refusal: Exception | None = None

    async def get_model(self, name: str) -> Model:
        return self.model

    async def ensure_placement(self, name: str, request_id: str = "") -> tuple[list[Placement], str]:
        self.ensured.append((name, request_id))
        if self.refusal is not None:
            raise self.refusal
        return [_placement(ModelState.LOADING)], "node-a"


class Loader:
    def __init__(self) -> None:
        self.loads: list[str] = []

    async def ensure_loaded(self, name: str, *, reason: str, timeout_seconds: float | None) -> Model:
        self.loads.append(name)
        return _model(ModelState.READY)


def _fleet_table() -> RoutingTable:
    """A table whose registry knows one live node, node-a."""
    table = RoutingTable("127.0.0.1:1")
    node = Node(node_id="node-a", triton_address="a:1", state=NodeState.LIVE, incarnation=1)
    table.apply(NodeChange(ChangeType.INITIAL, node))
    return table


def _catalog(table: RoutingTable, registry: Registry, loader: Loader) -> ModelCatalog:
    return ModelCatalog(registry, FleetOnDemand(registry, loader, table), table)  # type: ignore[arg-type]


async def test_with_no_node_registered_the_loader_loads_the_model_as_before() -> None:
    table = RoutingTable("127.0.0.1:1")
    registry, loader = Registry(_model(ModelState.STAGED)), Loader()
    serving = await _catalog(table, registry, loader).acquire("m", wait_seconds=30)
    assert serving.cold_start and loader.loads == ["m"] and registry.ensured == []
    assert [route.node_id for route in table.routes("m")] == [DEFAULT_NODE_ID]


async def test_with_nodes_the_placer_is_asked_and_the_request_waits_for_the_copy_to_be_ready() -> None:
    table = RoutingTable("127.0.0.1:1")
    table.apply(
        NodeChange(
            ChangeType.INITIAL, Node(node_id="node-a", triton_address="a:1", state=NodeState.LIVE, incarnation=1)
        )
    )
    registry, loader = Registry(_model(ModelState.STAGED)), Loader()
    catalog = _catalog(table, registry, loader)
    waiting = asyncio.create_task(catalog.acquire("m", wait_seconds=30))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not waiting.done() and [name for name, _ in registry.ensured] == ["m"] and loader.loads == []
    table.apply(PlacementChange(ChangeType.UPDATED, _placement(ModelState.READY)))
    serving = await asyncio.wait_for(waiting, 5)
    assert serving.cold_start and [route.node_id for route in table.routes("m")] == ["node-a"]


async def test_a_model_no_node_can_take_is_refused_with_the_placers_reason() -> None:
    table = RoutingTable("127.0.0.1:1")
    table.apply(
        NodeChange(
            ChangeType.INITIAL, Node(node_id="node-a", triton_address="a:1", state=NodeState.LIVE, incarnation=1)
        )
    )
    registry, loader = Registry(_model(ModelState.STAGED)), Loader()
    registry.refusal = ResourceExhausted(
        "No node can take model 'm': the largest free budget is 1 GiB, it needs 2 GiB."
    )
    with pytest.raises(ResourceExhausted, match="largest free budget is 1 GiB"):
        await _catalog(table, registry, loader).acquire("m", wait_seconds=30)


async def test_a_copy_not_ready_within_the_deadline_is_a_503_with_retry_after_and_the_load_goes_on() -> None:
    table = RoutingTable("127.0.0.1:1")
    table.apply(
        NodeChange(
            ChangeType.INITIAL, Node(node_id="node-a", triton_address="a:1", state=NodeState.LIVE, incarnation=1)
        )
    )
    registry, loader = Registry(_model(ModelState.STAGED)), Loader()
    catalog = _catalog(table, registry, loader)
    with pytest.raises(ModelLoading, match="was not ready within this request's deadline") as late:
        await catalog.acquire("m", wait_seconds=1.2)
    assert late.value.retry_after_seconds is not None and late.value.retry_after_seconds >= 1
    # The copy becomes READY after the request gave up; the next request finds it without asking again.
    table.apply(PlacementChange(ChangeType.UPDATED, _placement(ModelState.READY)))
    await asyncio.sleep(0)
    await catalog.acquire("m", wait_seconds=30)
    assert len(registry.ensured) == 1
    await catalog.stop()
