"""The fleet's rules (nodes, leases, placements, derived model status), against real SQLite and
PostgreSQL databases, without a gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from modelplane.common.types import (
    FileDigest,
    ModelAsset,
    ModelSpec,
    ModelState,
    PackageManifest,
    PlacementPolicy,
    ServingProfile,
    Task,
)
from modelplane.registry.errors import (
    InvalidModelSpec,
    InvalidNode,
    InvalidPlacement,
    ModelNotFound,
    ModelPlaced,
    NodeIdInUse,
    NodeLeaseLost,
    NodeNotFound,
    NodeUnavailable,
    PlacementNotFound,
    StaleTransition,
)
from modelplane.registry.fleet import Node, NodeDevice, NodeState, Placement, PlacementTarget
from modelplane.registry.fleet_handlers import FleetHandler, PlacementTransition
from modelplane.registry.handlers import RegistryHandler, Transition
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import ChangeType, ModelChange, NodeChange, PlacementChange

# The shortest lease a node may take; a node that must lapse takes it only when it is to lapse,
# so that a slow machine cannot lose a lease in the middle of a test.
SHORT = timedelta(seconds=1)
LONG = timedelta(minutes=1)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RegistryStore]:
    store = await RegistryStore.open(database_url)
    yield store
    await store.close()


@pytest.fixture
def models(store: RegistryStore) -> RegistryHandler:
    return RegistryHandler(store)


@pytest.fixture
def fleet(store: RegistryStore) -> FleetHandler:
    return FleetHandler(store)


def node(node_id: str = "node-0", holder: str = "loader@host-a pid 311 aaaa", **fields: object) -> Node:
    port = 50052 + 10 * int(node_id.removeprefix("node-")) if node_id.startswith("node-") else 50052
    values: dict[str, object] = {
        "loader_address": f"10.0.0.5:{port}",
        "triton_address": f"10.0.0.5:{port + 1}",
        "holder": holder,
        "devices": [NodeDevice(device="cpu", capacity_bytes=8 << 30, used_bytes=1 << 30, total_bytes=9 << 30)],
        **fields,
    }
    return Node(node_id=node_id, **values)  # type: ignore[arg-type]


async def lapse(fleet: FleetHandler, *node_ids: str) -> None:
    """The nodes' processes stop renewing: each takes the shortest lease, and once all have lapsed
    the registry's sweep runs, as it does every second."""
    for held in await fleet.list_nodes(list(node_ids)):
        await fleet.register_node(held, lease_duration=SHORT)  # the same holder: the same incarnation
    while True:
        nodes = await fleet.list_nodes(list(node_ids))
        if all(n.state == NodeState.LOST for n in nodes):
            break
        await asyncio.sleep(0.1)
    await fleet.mark_lost_nodes()


async def register_model(models: RegistryHandler, name: str = "minilm", **fields: object) -> None:
    await models.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"/m/{name}", **fields), load=True)  # type: ignore[arg-type]


async def report(
    fleet: FleetHandler, registered: Node, model: str, *states: ModelState, **fields: object
) -> tuple[Placement, object]:
    placement = None
    result = None
    for state in states:
        [placement] = await fleet.list_placements([model], [registered.node_id])
        result = await fleet.transition_placement(
            PlacementTransition(
                model_name=model,
                node_id=registered.node_id,
                incarnation=registered.incarnation,
                version=placement.version,
                to_state=state,
                **{"message": f"{state.name} on {registered.node_id}", **fields},  # type: ignore[arg-type]
            )
        )
    assert result is not None
    return result[0], result[1]


LOAD = (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING, ModelState.READY)


# Nodes and their leases --------------------------------------------------------------------------


async def test_a_node_registers_with_an_incarnation_and_a_lease(fleet: FleetHandler) -> None:
    registered = await fleet.register_node(node(labels={"gpu": "h100", "zone": "a"}), lease_duration=LONG)
    assert (registered.incarnation, registered.state, registered.draining) == (1, NodeState.LIVE, False)
    assert registered.lease_expire_time - registered.lease_renew_time == LONG  # type: ignore[operator]
    [listed] = await fleet.list_nodes()
    assert listed.labels == {"gpu": "h100", "zone": "a"}
    assert listed.devices[0].free_bytes == 7 << 30


async def test_a_second_process_claiming_a_live_id_is_refused_naming_who_holds_it(fleet: FleetHandler) -> None:
    first = await fleet.register_node(node(), lease_duration=LONG)
    with pytest.raises(NodeIdInUse) as refused:
        await fleet.register_node(node(holder="loader@host-b pid 99 bbbb"))
    message = refused.value.message
    assert "Node id 'node-0' is in use: held by loader@host-a pid 311 aaaa" in message
    assert "loader 10.0.0.5:50052" in message
    assert f"its lease expires {first.lease_expire_time.isoformat(timespec='seconds')}" in message  # type: ignore[union-attr]
    assert "stop it, or give this process another node id" in message
    assert refused.value.code.name == "ALREADY_EXISTS"
    assert 50 < refused.value.retry_after_seconds <= 60  # type: ignore[operator]
    # The holder is untouched.
    [held] = await fleet.list_nodes()
    assert (held.holder, held.incarnation) == (first.holder, 1)


async def test_the_same_holder_registering_again_keeps_its_incarnation(fleet: FleetHandler) -> None:
    await fleet.register_node(node())
    again = await fleet.register_node(node(triton_address="10.0.0.6:8001"))
    assert again.incarnation == 1 and again.triton_address == "10.0.0.6:8001"


async def test_a_lapsed_lease_makes_the_node_lost_and_another_process_may_take_the_id(fleet: FleetHandler) -> None:
    first = await fleet.register_node(node(), lease_duration=LONG)
    await fleet.drain_node("node-0")
    await lapse(fleet, "node-0")
    [lost] = await fleet.list_nodes()
    assert lost.state == NodeState.LOST
    assert await fleet.mark_lost_nodes() == []  # recorded once
    with pytest.raises(NodeLeaseLost, match=r"The lease of node 'node-0' \(incarnation 1\) expired .* ago"):
        await fleet.renew_node_lease("node-0", first.incarnation)
    second = await fleet.register_node(node(holder="loader@host-b pid 99 bbbb"))
    assert (second.incarnation, second.state, second.draining) == (2, NodeState.LIVE, False)
    with pytest.raises(NodeLeaseLost, match=r"registered again by another process .* no longer holds it"):
        await fleet.renew_node_lease("node-0", first.incarnation)


async def test_renewal_moves_the_lease_and_records_the_budgets(fleet: FleetHandler) -> None:
    registered = await fleet.register_node(node(), lease_duration=LONG)
    budgets = [NodeDevice(device="cpu", capacity_bytes=8 << 30, used_bytes=3 << 30)]
    renewed = await fleet.renew_node_lease("node-0", registered.incarnation, budgets)
    assert renewed.lease_expire_time > registered.lease_expire_time  # type: ignore[operator]
    assert renewed.devices == budgets
    with pytest.raises(NodeNotFound, match="Node 'ghost' is not registered"):
        await fleet.renew_node_lease("ghost", 1)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (node("Node_0"), "node id 'Node_0' is not valid"),
        (node(loader_address="localhost"), "loader_address 'localhost' is not host:port"),
        (node(triton_address="h:99999"), "triton_address 'h:99999' is not host:port"),
        (node(holder=" "), "holder is empty"),
        (node(labels={"-bad": "x"}), "label key '-bad' is not valid"),
        (node(devices=[NodeDevice(device="cpu"), NodeDevice(device="cpu")]), "device 'cpu' is listed twice"),
    ],
)
async def test_malformed_nodes_are_refused_with_what_to_fix(fleet: FleetHandler, bad: Node, message: str) -> None:
    with pytest.raises(InvalidNode, match=message):
        await fleet.register_node(bad)


async def test_a_lease_outside_its_bounds_is_refused(fleet: FleetHandler) -> None:
    with pytest.raises(InvalidNode, match=r"lease_duration 0.5 s is outside 1 s to 10 min"):
        await fleet.register_node(node(), lease_duration=timedelta(seconds=0.5))


async def test_a_node_is_deleted_only_once_lost_and_takes_its_placements(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models)
    await fleet.register_node(node(), lease_duration=LONG)
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    with pytest.raises(NodeUnavailable, match=r"Node 'node-0' is LIVE: held by .* delete it once it is LOST"):
        await fleet.delete_node("node-0")
    await lapse(fleet, "node-0")
    await fleet.delete_node("node-0")
    assert await fleet.list_nodes() == [] and await fleet.list_placements() == []
    events = await models.events(name="minilm")
    assert events[-1].node_id == "node-0" and "node 'node-0' was deleted" in events[-1].message


# Placements: the placer's side ------------------------------------------------------------------


async def test_the_placer_places_and_generations_grow_only_when_it_asks_again(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models)
    await fleet.register_node(node())
    target = PlacementTarget(model_name="minilm", node_id="node-0", decision="spread")
    [placed], _ = await fleet.set_placements([target])
    assert (placed.version, placed.generation, placed.status.state) == (1, 1, ModelState.REGISTERED)
    [same], _ = await fleet.set_placements([target])
    assert same.generation == 1
    [again], _ = await fleet.set_placements([target.model_copy(update={"redo": True})])
    assert again.generation == 2
    await models.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m/minilm-v2"), load=True)
    [upgraded], _ = await fleet.set_placements([target])
    assert (upgraded.version, upgraded.generation) == (2, 3)
    _, [removed] = await fleet.set_placements([], [("minilm", "node-0")])
    assert removed.key == ("minilm", "node-0") and await fleet.list_placements() == []
    messages = [e.message for e in await models.events(name="minilm") if e.node_id]
    assert messages == [
        "placed on node node-0 (version 1, generation 1): spread",
        "asked node node-0 again (version 1, generation 2): spread",
        "asked node node-0 again (version 2, generation 3): spread",
        "removed from node node-0: the placer removed it",
    ]


async def test_placements_the_registry_cannot_honour_are_refused_whole(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models, "gpu-model", placement=PlacementPolicy(node_selector={"gpu": "h100"}))
    await register_model(models, "minilm")
    await register_model(models, "other")
    await fleet.register_node(node("node-0", labels={"gpu": "l4"}))
    await fleet.register_node(node("node-1", holder="loader@b 2 cc"), lease_duration=LONG)
    await fleet.register_node(node("node-2", holder="loader@c 3 dd"))
    await fleet.drain_node("node-2")
    cases = [
        (PlacementTarget(model_name="ghost", node_id="node-0"), ModelNotFound, "Model 'ghost' is not registered"),
        (PlacementTarget(model_name="minilm", node_id="node-9"), NodeNotFound, "Node 'node-9' is not registered"),
        (
            PlacementTarget(model_name="gpu-model", node_id="node-0"),
            InvalidPlacement,
            "lacks the labels the model's node_selector requires \\(gpu=h100\\); it carries gpu=l4",
        ),
        (PlacementTarget(model_name="minilm", node_id="node-0", version=2), InvalidPlacement, "versions 1 to 1"),
        (PlacementTarget(model_name="minilm", node_id="node-2"), NodeUnavailable, "the node is draining"),
    ]
    for target, error, message in cases:
        # Each bad target spoils a batch that also holds a good one: nothing is written.
        with pytest.raises(error, match=message):
            await fleet.set_placements([PlacementTarget(model_name="other", node_id="node-0"), target])
    with pytest.raises(InvalidPlacement, match="appear more than once: minilm on node-0"):
        await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")] * 2)
    await lapse(fleet, "node-1")
    with pytest.raises(NodeUnavailable, match="the node is LOST"):
        await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-1")])
    assert await fleet.list_placements() == []


# Placements: the node's side, and the model's derived status ----------------------------------


async def test_a_stale_incarnation_cannot_write_a_placement(models: RegistryHandler, fleet: FleetHandler) -> None:
    await register_model(models)
    old = await fleet.register_node(node(), lease_duration=LONG)
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    await report(fleet, old, "minilm", ModelState.FETCHING)
    await lapse(fleet, "node-0")
    with pytest.raises(NodeLeaseLost, match=r"expired .* the node is LOST. Stop serving its copies"):
        await report(fleet, old, "minilm", ModelState.VERIFYING)
    new = await fleet.register_node(node(holder="loader@host-b pid 99 bbbb"))
    with pytest.raises(NodeLeaseLost, match=r"registered again by another process .*incarnation 1\) no longer"):
        await report(fleet, old, "minilm", ModelState.VERIFYING)
    [placement] = await fleet.list_placements()
    assert (placement.status.state, placement.status.incarnation) == (ModelState.FETCHING, 1)
    placement, _ = await report(fleet, new, "minilm", ModelState.VERIFYING)
    assert placement.status.incarnation == new.incarnation == 2


async def test_transitions_of_a_copy_follow_the_lifecycle_and_its_placement(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models)
    registered = await fleet.register_node(node())
    with pytest.raises(PlacementNotFound, match=r"not placed on node 'node-0'.*unload the copy"):
        await fleet.transition_placement(
            PlacementTransition(
                model_name="minilm", node_id="node-0", incarnation=1, version=1, to_state=ModelState.FETCHING
            )
        )
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    with pytest.raises(StaleTransition, match="on node 'node-0' cannot go from REGISTERED to READY"):
        await report(fleet, registered, "minilm", ModelState.READY)
    with pytest.raises(StaleTransition, match="wanted at version 1; the transition for version 2 is stale"):
        await fleet.transition_placement(
            PlacementTransition(
                model_name="minilm", node_id="node-0", incarnation=1, version=2, to_state=ModelState.FETCHING
            )
        )
    with pytest.raises(InvalidPlacement, match="at generation 1; observed_generation 2 is ahead of it"):
        await report(fleet, registered, "minilm", ModelState.FETCHING, observed_generation=2)


async def test_a_models_status_is_derived_from_its_copies(models: RegistryHandler, fleet: FleetHandler) -> None:
    await register_model(models)
    first = await fleet.register_node(node("node-0"), lease_duration=LONG)
    second = await fleet.register_node(node("node-1", holder="loader@b 2 cc"), lease_duration=LONG)
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id=n) for n in ("node-0", "node-1")])
    assert (await models.get("minilm")).status.reason == "not held by any live node"

    await report(fleet, first, "minilm", ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED)
    await report(fleet, second, "minilm", ModelState.FETCHING)
    await report(fleet, second, "minilm", ModelState.FAILED, message="disk full")
    model = await models.get("minilm")
    assert model.state == ModelState.STAGED  # a copy still on its way says more than one that failed
    assert "node-1 failed: disk full" in model.status.reason

    await report(fleet, first, "minilm", ModelState.LOADING, ModelState.READY, observed_generation=1)
    model = await models.get("minilm")
    assert model.state == ModelState.READY
    assert model.status.reason.startswith("ready on 1 of 2 nodes (node-0)")
    assert [d.phase for d in model.status.phase_durations] == [
        ModelState.FETCHING,
        ModelState.VERIFYING,
        ModelState.LOADING,
    ]

    # The node holding the only READY copy is lost: its copy no longer counts.
    await lapse(fleet, "node-0")
    model = await models.get("minilm")
    assert model.state == ModelState.FAILED and model.status.reason.startswith("failed on every node (1)")
    # A new process on node-0: what the old one reported says nothing of what the new one holds.
    restarted = await fleet.register_node(node("node-0", holder="loader@a pid 2 ee"), lease_duration=LONG)
    await report(fleet, second, "minilm", ModelState.LOADING)
    model = await models.get("minilm")
    assert model.state == ModelState.LOADING and model.status.reason.startswith("LOADING on node-1")
    await report(fleet, restarted, "minilm", ModelState.READY)
    assert (await models.get("minilm")).state == ModelState.READY


async def test_a_model_without_placements_keeps_its_model_level_status(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models, "single")
    await register_model(models, "placed")
    await fleet.register_node(node())
    await fleet.set_placements([PlacementTarget(model_name="placed", node_id="node-0")])
    # Today's single-node loader keeps moving the models nobody placed.
    model, _ = await models.transition(Transition("single", 1, ModelState.FETCHING, message="fetching"))
    assert model.state == ModelState.FETCHING
    # A placed model's state belongs to its copies: one writer per field.
    with pytest.raises(ModelPlaced, match="'placed' is placed on node-0; its state is derived from its copies"):
        await models.transition(Transition("placed", 1, ModelState.FETCHING))


async def test_a_copy_records_what_its_load_established_on_the_model(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models)
    registered = await fleet.register_node(node())
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    manifest = PackageManifest(files=[FileDigest(path="m.onnx", size_bytes=3, sha256="1" * 64)], sha256="2" * 64)
    profile = ServingProfile(triton_model_name="minilm", embedding_dimension=384)
    asset = ModelAsset(name="tokenizer.json", sha256="3" * 64, content=b"{}")
    await report(fleet, registered, "minilm", ModelState.FETCHING, ModelState.VERIFYING)
    await report(fleet, registered, "minilm", ModelState.STAGED, manifest=manifest, profile=profile, assets=[asset])
    placement, model = await report(
        fleet, registered, "minilm", ModelState.LOADING, ModelState.READY, footprint_bytes=90 << 20
    )
    assert placement.status.footprint_bytes == 90 << 20 == model.status.footprint_bytes  # type: ignore[attr-defined]
    served, assets = await models.assets("minilm")
    assert served.embedding_dimension == 384 and assets == [asset]
    assert (await models.get("minilm")).status.manifest == manifest
    events = [e for e in await models.events(name="minilm") if e.node_id == "node-0" and e.to_state]
    assert [(e.from_state, e.to_state) for e in events][-2:] == [
        (ModelState.STAGED, ModelState.LOADING),
        (ModelState.LOADING, ModelState.READY),
    ]


async def test_deleting_a_model_removes_its_placements(models: RegistryHandler, fleet: FleetHandler) -> None:
    await register_model(models)
    await fleet.register_node(node())
    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    await models.delete("minilm")
    assert await fleet.list_placements() == []


async def test_a_placement_policy_is_validated_and_changes_in_place(models: RegistryHandler) -> None:
    with pytest.raises(InvalidModelSpec, match=r"placement.min_copies \(3\) exceeds placement.max_copies \(2\)"):
        await register_model(models, placement=PlacementPolicy(min_copies=3, max_copies=2))
    with pytest.raises(InvalidModelSpec, match=r"placement.max_copies is -1: use 0 to 1000"):
        await register_model(models, placement=PlacementPolicy(max_copies=-1))
    with pytest.raises(InvalidModelSpec, match=r"placement.node_selector: label key 'a b' is not valid"):
        await register_model(models, placement=PlacementPolicy(node_selector={"a b": "x"}))
    await register_model(models, placement=PlacementPolicy(min_copies=2))
    updated = await models.update(
        ModelSpec(name="minilm", placement=PlacementPolicy(min_copies=1, max_copies=4, node_selector={"zone": "a"})),
        ["placement"],
    )
    assert updated.version == 1
    assert updated.spec.placement == PlacementPolicy(min_copies=1, max_copies=4, node_selector={"zone": "a"})
    with pytest.raises(InvalidModelSpec, match="bad placement policy"):
        await models.update(
            ModelSpec(name="minilm", placement=PlacementPolicy(min_copies=5, max_copies=4)), ["placement"]
        )


# The watch --------------------------------------------------------------------------------------


async def test_nodes_and_placements_reach_only_the_watchers_that_ask_for_them(
    models: RegistryHandler, fleet: FleetHandler
) -> None:
    await register_model(models)
    await register_model(models, "other")
    registered = await fleet.register_node(node())
    await fleet.set_placements([PlacementTarget(model_name="other", node_id="node-0")])
    # A watcher is subscribed once its snapshot has come: nodes first, then models, then placements.
    plain = models.watch(include_initial=True)
    assert [type(await anext(plain)) for _ in range(2)] == [ModelChange, ModelChange]
    fleet_watch = models.watch(include_initial=True, include_nodes=True, include_placements=True)
    snapshot = [await anext(fleet_watch) for _ in range(4)]
    assert [(type(c).__name__, c.change_type) for c in snapshot] == [
        ("NodeChange", ChangeType.INITIAL),
        ("ModelChange", ChangeType.INITIAL),
        ("ModelChange", ChangeType.INITIAL),
        ("PlacementChange", ChangeType.INITIAL),
    ]

    await fleet.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
    await fleet.renew_node_lease("node-0", registered.incarnation)  # only the expiry moves: not announced
    await report(fleet, registered, "minilm", ModelState.FETCHING)
    await fleet.drain_node("node-0")

    seen = [await asyncio.wait_for(anext(fleet_watch), 10) for _ in range(5)]
    assert [(type(c).__name__, c.change_type) for c in seen] == [
        ("PlacementChange", ChangeType.REGISTERED),
        ("ModelChange", ChangeType.UPDATED),  # derived: not held by any live node yet
        # The renewal moved only the lease's expiry: nothing was announced for it.
        ("PlacementChange", ChangeType.UPDATED),
        ("ModelChange", ChangeType.UPDATED),  # derived: FETCHING on node-0
        ("NodeChange", ChangeType.UPDATED),
    ]
    assert isinstance(seen[2], PlacementChange) and seen[2].placement.status.state == ModelState.FETCHING
    assert isinstance(seen[4], NodeChange) and seen[4].node.state == NodeState.DRAINING
    # The model-only watcher saw the model's derived changes and nothing of nodes or placements.
    first_plain = await asyncio.wait_for(anext(plain), 10)
    second_plain = await asyncio.wait_for(anext(plain), 10)
    assert all(isinstance(c, ModelChange) for c in (first_plain, second_plain))
    assert second_plain.model.state == ModelState.FETCHING  # type: ignore[union-attr]
    await plain.aclose()
    await fleet_watch.aclose()
