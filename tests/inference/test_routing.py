"""Routing in isolation: the chooser, the retry rules, which copies are routable, and the clients.

Each node's Triton stands in as a recorder whose failures the test decides, so that which node
fails and when is not left to chance; tests/integration/test_routing.py runs real tritonservers.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
import pytest

from modelplane.common.errors import Internal
from modelplane.common.types import Model, ModelSpec, ModelState, ModelStatus
from modelplane.inference.errors import (
    InvalidRequest,
    ModelLoading,
    ModelNotOnNode,
    NodeUnreachable,
    StreamInterrupted,
    TritonUnavailable,
)
from modelplane.inference.routing import (
    DEFAULT_NODE_ID,
    NODE_REQUESTS,
    Route,
    Router,
    RoutingTable,
    choose,
    retryable,
)
from modelplane.registry.fleet import Node, NodeState, Placement, PlacementStatus
from modelplane.registry.watch import ChangeType, ModelChange, NodeChange, PlacementChange

DEFAULT_ADDRESS = "127.0.0.1:1"


def _unreachable() -> NodeUnreachable:
    return NodeUnreachable("Triton is not reachable; it may be restarting. Retry shortly.", retry_after_seconds=2.0)


class FakeTriton:
    """One node's Triton: answers with its address, or fails as the test says."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls = 0
        self.failure: Exception | None = None
        self.fail_after_items: int | None = None
        self.closed = False

    async def infer(self, model: str, arrays: Mapping[str, np.ndarray], output: str, **_: Any) -> np.ndarray:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return np.array([self.address])

    async def generate(self, model: str, prompt: str, sampling: Any, **_: Any) -> AsyncIterator[str]:
        self.calls += 1
        for index in range(3):
            if self.failure is not None and index == (self.fail_after_items or 0):
                raise self.failure
            yield f"{self.address}:{index}"

    async def close(self) -> None:
        self.closed = True


def _model(name: str = "m", *, state: ModelState = ModelState.READY, version: int = 1) -> Model:
    return Model(spec=ModelSpec(name=name), version=version, status=ModelStatus(state=state))


def _node(node_id: str, *, state: NodeState = NodeState.LIVE, incarnation: int = 1) -> Node:
    return Node(node_id=node_id, triton_address=f"{node_id}:8001", state=state, incarnation=incarnation)


def _placement(
    node_id: str, *, state: ModelState = ModelState.READY, incarnation: int = 1, version: int = 1, model: str = "m"
) -> Placement:
    return Placement(
        model_name=model,
        node_id=node_id,
        version=version,
        generation=1,
        status=PlacementStatus(state=state, incarnation=incarnation, version=version),
    )


def _table(*nodes: Node, placements: tuple[Placement, ...] = (), model: Model | None = None) -> RoutingTable:
    table = RoutingTable(DEFAULT_ADDRESS)
    table.apply(ModelChange(ChangeType.INITIAL, model or _model()))
    for node in nodes:
        table.apply(NodeChange(ChangeType.INITIAL, node))
    for placement in placements:
        table.apply(PlacementChange(ChangeType.INITIAL, placement))
    return table


def _router(table: RoutingTable, seed: int = 7) -> tuple[Router, dict[str, FakeTriton]]:
    made: dict[str, FakeTriton] = {}

    def connect(address: str) -> FakeTriton:
        made[address] = FakeTriton(address)
        return made[address]

    return Router(table, rng=random.Random(seed), connect=connect), made  # type: ignore[arg-type]


# The chooser ---------------------------------------------------------------------------------------


def test_the_chooser_takes_the_only_candidate_and_the_less_busy_of_two() -> None:
    rng = random.Random(1)
    assert choose(["a"], lambda _: 5, rng) == "a"
    load = {"a": 3, "b": 1}
    assert {choose(["a", "b"], load.__getitem__, rng) for _ in range(50)} == {"b"}


def test_the_chooser_never_picks_the_busiest_and_spreads_over_equals() -> None:
    rng = random.Random(2)
    load = {"a": 0, "b": 0, "c": 0, "busy": 9}
    picks = [choose(list(load), load.__getitem__, rng) for _ in range(3000)]
    assert "busy" not in picks
    for name in ("a", "b", "c"):
        assert 800 < picks.count(name) < 1200, picks.count(name)


# The retry rules -----------------------------------------------------------------------------------


def test_only_failures_of_the_node_are_retried() -> None:
    assert retryable(_unreachable())
    assert retryable(ModelNotOnNode("Model 'm' is not loaded in Triton right now.", retry_after_seconds=2.0))
    assert not retryable(InvalidRequest("Input 0 has token id 99999, outside model 'm''s vocabulary."))
    assert not retryable(Internal("Triton failed to run model 'm': boom"))
    assert not retryable(TritonUnavailable("Triton did not answer in time for model 'm'.", retry_after_seconds=1.0))
    assert not retryable(ModelLoading("Model 'm' is loading.", retry_after_seconds=1.0))


# Which copies are routable --------------------------------------------------------------------------


def test_routes_are_ready_copies_on_live_or_draining_nodes_of_the_current_process_and_version() -> None:
    table = _table(
        _node("node-a"),
        _node("node-b", state=NodeState.DRAINING),
        _node("node-c", state=NodeState.LOST),
        _node("node-d", incarnation=2),
        _node("node-e"),
        _node("node-f"),
        placements=(
            _placement("node-a"),
            _placement("node-b"),
            _placement("node-c"),  # its node is lost
            _placement("node-d", incarnation=1),  # written by the node's previous process
            _placement("node-e", state=ModelState.LOADING),
            _placement("node-f", version=0),  # a copy of another version
        ),
    )
    assert table.routes("m") == [Route("node-a", "node-a:8001"), Route("node-b", "node-b:8001")]
    assert table.routes("unknown") == []


def test_a_model_placed_nowhere_is_served_by_the_configured_triton_while_ready() -> None:
    assert _table().routes("m") == [Route(DEFAULT_NODE_ID, DEFAULT_ADDRESS)]
    assert _table(model=_model(state=ModelState.STAGED)).routes("m") == []
    # A registered node-0 lends its address.
    assert _table(_node("node-0")).routes("m") == [Route("node-0", "node-0:8001")]
    # Once placed, only its placements count: a copy still loading is no route.
    loading = _table(_node("node-a"), placements=(_placement("node-a", state=ModelState.LOADING),))
    assert loading.routes("m") == []


def test_routes_follow_changes_and_a_resync_forgets_what_is_gone() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    assert [route.node_id for route in table.routes("m")] == ["node-a", "node-b"]
    table.apply(PlacementChange(ChangeType.DELETED, _placement("node-b")))
    assert [route.node_id for route in table.routes("m")] == ["node-a"]
    table.apply(NodeChange(ChangeType.UPDATED, _node("node-a", state=NodeState.LOST)))
    assert table.routes("m") == []
    table.apply(PlacementChange(ChangeType.UPDATED, _placement("node-b")))
    table.keep_only({"m"}, {"node-b"}, {("m", "node-b")})
    assert set(table.nodes) == {"node-b"}
    assert [route.node_id for route in table.routes("m")] == ["node-b"]


# The router -----------------------------------------------------------------------------------------


async def test_one_client_per_node_reused_and_both_copies_used() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, made = _router(table)
    for _ in range(40):
        await router.infer("m", {}, "out")
    assert set(made) == {"node-a:8001", "node-b:8001"}
    assert all(triton.calls > 0 for triton in made.values())
    assert sum(triton.calls for triton in made.values()) == 40


async def test_a_node_that_fails_a_call_is_replaced_once_and_set_aside() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, _ = _router(table)
    await router.infer("m", {}, "out")
    await router.infer("m", {}, "out")
    failing = router.links["node-a"].triton
    failing.failure = _unreachable()  # type: ignore[attr-defined]
    answers = [(await router.infer("m", {}, "out"))[0] for _ in range(10)]
    assert set(answers) == {"node-b:8001"}
    # Set aside after its first failure: at most one call reached it.
    assert failing.calls <= 3  # type: ignore[attr-defined]
    before = NODE_REQUESTS.labels("node-b")._value.get()
    await router.infer("m", {}, "out")
    assert NODE_REQUESTS.labels("node-b")._value.get() == before + 1


async def test_failures_of_the_request_are_not_retried_and_a_second_node_failure_is_the_answer() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, _ = _router(table)
    router._link(Route("node-a", "node-a:8001"))
    router._link(Route("node-b", "node-b:8001"))
    links = dict(router.links)
    for link in links.values():
        link.triton.failure = InvalidRequest("bad input")  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest):
        await router.infer("m", {}, "out")
    assert sum(link.triton.calls for link in links.values()) == 1  # type: ignore[attr-defined]
    for link in links.values():
        link.triton.failure = _unreachable()  # type: ignore[attr-defined]
    with pytest.raises(NodeUnreachable):
        await router.infer("m", {}, "out")
    assert sum(link.triton.calls for link in links.values()) == 3  # type: ignore[attr-defined]


async def test_with_one_copy_a_node_failure_is_the_answer() -> None:
    router, made = _router(_table())
    router.pick("m")
    made[DEFAULT_ADDRESS].failure = _unreachable()
    with pytest.raises(NodeUnreachable):
        await router.infer("m", {}, "out")
    assert made[DEFAULT_ADDRESS].calls == 1


async def test_no_ready_copy_is_a_503_that_asks_to_retry() -> None:
    router, _ = _router(_table(model=_model(state=ModelState.LOADING)))
    with pytest.raises(ModelLoading, match="no ready copy"):
        await router.infer("m", {}, "out")


async def test_a_stream_that_fails_before_its_first_item_goes_once_to_another_copy() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, made = _router(table)
    router._link(Route("node-a", "node-a:8001"))
    router._link(Route("node-b", "node-b:8001"))
    made["node-a:8001"].failure = _unreachable()
    for _ in range(5):
        items = [item async for item in router.generate("m", "hi", {}, stream=True)]
        assert items == [f"node-b:8001:{i}" for i in range(3)]
    # Set aside after its failure: the retried stream was its only one.
    assert made["node-a:8001"].calls == 1


async def test_a_stream_that_fails_after_its_first_item_is_not_replayed() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, made = _router(table)
    for triton_address in ("node-a:8001", "node-b:8001"):
        router._link(Route(triton_address.split(":")[0], triton_address))
    for triton in made.values():
        triton.failure = _unreachable()
        triton.fail_after_items = 1
    received: list[str] = []

    async def read() -> None:
        async for item in router.generate("m", "hi", {}, stream=True):
            received.append(item)

    with pytest.raises(StreamInterrupted, match="not generated again"):
        await read()
    assert len(received) == 1
    assert sum(triton.calls for triton in made.values()) == 1


async def test_a_stream_refused_for_its_request_is_not_retried() -> None:
    router, made = _router(_table(_node("node-a"), placements=(_placement("node-a"),)))
    router.pick("m").triton.failure = InvalidRequest("the prompt is too long")  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest):
        async for _ in router.generate("m", "hi", {}, stream=True):
            pass
    assert made["node-a:8001"].calls == 1


async def test_the_client_of_a_node_that_is_gone_is_closed_and_a_new_address_gets_a_new_client() -> None:
    table = _table(_node("node-a"), _node("node-b"), placements=(_placement("node-a"), _placement("node-b")))
    router, made = _router(table)
    router._link(Route("node-a", "node-a:8001"))
    router._link(Route("node-b", "node-b:8001"))
    table.apply(NodeChange(ChangeType.UPDATED, _node("node-b", state=NodeState.LOST)))
    assert router.pick("m").node_id == "node-a"
    moved = Node(node_id="node-a", triton_address="node-a:9001", state=NodeState.LIVE, incarnation=1)
    table.apply(NodeChange(ChangeType.UPDATED, moved))
    assert router.pick("m").address == "node-a:9001"
    assert set(router.links) == {"node-a"}
    await router.close()  # also waits for the clients closed on the way
    assert made["node-b:8001"].closed and made["node-a:8001"].closed and made["node-a:9001"].closed
