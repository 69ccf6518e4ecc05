"""A fleet of two nodes on this machine (tests/integration/fleet.py): each a real tritonserver and a
real loader in fleet mode, one registry on SQLite (test_fleet_postgres.py runs two replicas on real
PostgreSQL), small real-architecture BERT encoders as the models, and a host budget per node that
holds two of them.

The nodes hold what their placements say and record each copy's state; the registry derives what
users see. A node SIGKILLed (Triton and loader together) loses its lease, its copies move, and its
models are READY again elsewhere; started again it converges without loading anything twice.

What costs time: four tritonservers started (two per fleet), nine tiny encoders loaded, two lease
expiries of 10 s; about 2-3 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelplane.common.errors import InvalidArgument
from modelplane.common.types import DesiredState, Model, ModelState, PlacementPolicy
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeState, Placement, PlacementTarget
from tests.conftest import free_port
from tests.encoders import save_tiny_bert
from tests.integration.fleet import (
    LEASE_SECONDS,
    Fleet,
    all_ready,
    copies,
    node_in_state,
    register,
    running_fleet,
    until,
)

MIB = 2**20
# As in test_budget.py: each copy holds about 34 MiB of its own, and the copies share about 25 MiB
# of runtime; 112 MiB less the 10% margin (101 MiB) holds two, never three.
HOST_BUDGET = 112 * MIB
NODE_ENV = {
    "MODELPLANE_LOADER_HOST_MEMORY_BYTES": str(HOST_BUDGET),
    "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "1",
    "MODELPLANE_LOADER_EVICTION_GRACE_SECONDS": "0.2",
    "MODELPLANE_LOADER_RECONCILE_INTERVAL_SECONDS": "5",
}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-encoders")
    models = {f"enc-{i}": save_tiny_bert(root / f"enc-{i}", minilm_path, seed=100 + i) for i in range(4)}
    # Larger than a whole node's budget: no node can ever hold it.
    models["enc-huge"] = save_tiny_bert(root / "enc-huge", minilm_path, seed=7, hidden=384, layers=2)
    return models


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), 2, **NODE_ENV) as running:
        yield running


def cli(fleet: Fleet, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "modelplane.cli", *args],
        env={**os.environ, "MODELPLANE_CLI_REGISTRY": fleet.registry},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def loads_on(events: list, node_id: str) -> int:
    return sum(1 for e in events if e.node_id == node_id and e.to_state == ModelState.LOADING)


async def test_four_models_over_two_nodes_that_fit_two_each(fleet: Fleet, encoders: dict[str, Path]) -> None:
    names = [f"enc-{i}" for i in range(4)]
    async with RegistryClient(fleet.registry) as registry:
        nodes = {n.node_id: n for n in await registry.list_nodes()}
        assert sorted(nodes) == ["node-0", "node-1"]
        assert all(n.state == NodeState.LIVE and n.incarnation >= 1 for n in nodes.values())
        assert nodes["node-1"].loader_address == fleet.nodes["node-1"].loader
        assert nodes["node-1"].triton_address == fleet.nodes["node-1"].triton.grpc_address
        for name in names:
            await register(registry, name, encoders[name])
        await registry.set_placements(
            [PlacementTarget(model_name=n, node_id=f"node-{i // 2}", decision="test") for i, n in enumerate(names)]
        )
        models = await until(lambda: all_ready(registry, names), "four models READY", fleet)
        assert all("ready on 1 of 1 nodes" in m.status.reason for m in models), [m.status.reason for m in models]

        placements = await registry.list_placements(model_names=names)
        assert copies(placements) == {
            "enc-0": ["node-0"],
            "enc-1": ["node-0"],
            "enc-2": ["node-1"],
            "enc-3": ["node-1"],
        }
        nodes = {n.node_id: n for n in await registry.list_nodes()}
        for placement in placements:
            node = nodes[placement.node_id]
            assert placement.status.state == ModelState.READY
            assert placement.status.incarnation == node.incarnation
            assert placement.status.observed_generation == placement.generation
        # The budgets the nodes renew their leases with: two copies each, no node over its budget.
        await until(lambda: _budgets_reported(registry), "budgets with two copies each", fleet, limit=30)
        for node in await registry.list_nodes():
            for device in node.devices:
                assert 0 < device.used_bytes <= device.capacity_bytes, (node.node_id, device)

    listed = {m["name"]: m for m in json.loads(cli(fleet, "models", "ls", "--json"))["models"]}
    assert {name: listed[name]["state"] for name in names} == dict.fromkeys(names, "READY")
    shown = cli(fleet, "nodes", "ls")
    assert "node-0" in shown and "node-1" in shown and "LIVE" in shown


async def _budgets_reported(registry: RegistryClient) -> list[Node] | None:
    nodes = await registry.list_nodes()
    used = [d.used_bytes for n in nodes for d in n.devices]
    return nodes if used and all(u > 0 for u in used) else None


async def test_a_node_killed_loses_its_lease_and_its_models_are_ready_elsewhere(
    fleet: Fleet, encoders: dict[str, Path]
) -> None:
    async with RegistryClient(fleet.registry) as registry:
        # One copy per node, so node-0 has room for node-1's model.
        await registry.set_placements([], [("enc-1", "node-0"), ("enc-3", "node-1")])
        for name in ("enc-1", "enc-3"):
            await registry.set_desired_state(name, DesiredState.UNLOADED)
        await until(lambda: _only(registry, {"enc-0": ["node-0"], "enc-2": ["node-1"]}), "one copy per node", fleet)
        before = {n.node_id: n for n in await registry.list_nodes()}

        killed = time.monotonic()
        fleet.nodes["node-1"].kill()
        lost = await until(lambda: node_in_state(registry, "node-1", NodeState.LOST), "node-1 LOST", fleet, limit=60)
        lost_after = time.monotonic() - killed
        # A copy on a LOST node does not count: the registry derives the model's status again.
        enc2 = await until(lambda: _not_ready(registry, "enc-2"), "enc-2 not READY once node-1 is LOST", fleet)
        assert "not held by any live node" in enc2.status.reason, enc2.status.reason
        # The placer's part (off in these tests: they place copies themselves): the copy moves.
        await registry.set_placements(
            [PlacementTarget(model_name="enc-2", node_id="node-0", decision="moved off lost node-1")],
            [("enc-2", "node-1")],
        )
        await until(lambda: all_ready(registry, ["enc-0", "enc-2"]), "enc-2 READY on node-0", fleet)
        ready_after = time.monotonic() - killed
        print(
            f"\nfailover: node-1 LOST {lost_after:.1f} s after SIGKILL (lease {LEASE_SECONDS:g} s, last renewal "
            f"{before['node-1'].lease_renew_time}); enc-2 READY on node-0 {ready_after:.1f} s after SIGKILL"
        )
        assert lost.incarnation == before["node-1"].incarnation
        assert copies(await registry.list_placements()) == {"enc-0": ["node-0"], "enc-2": ["node-0"]}


async def test_a_restarted_node_converges_without_flapping_or_double_loads(
    fleet: Fleet, encoders: dict[str, Path]
) -> None:
    node = fleet.nodes["node-1"]
    async with RegistryClient(fleet.registry) as registry:
        old = {n.node_id: n for n in await registry.list_nodes()}["node-1"]
        node.start()
        new = await until(lambda: node_in_state(registry, "node-1", NodeState.LIVE), "node-1 LIVE again", fleet)
        assert new.incarnation > old.incarnation
        # It holds nothing (its copy moved while it was gone) and loads what it is given, once.
        start = max(e.id for e in await registry.events())
        await registry.set_placements([PlacementTarget(model_name="enc-3", node_id="node-1", decision="test")])
        await registry.set_desired_state("enc-3", DesiredState.LOADED)
        await until(lambda: all_ready(registry, ["enc-0", "enc-2", "enc-3"]), "enc-3 READY on node-1", fleet)
        mark = max(e.id for e in await registry.events())
        # Two reconciliation rounds (5 s each) and several lease renewals: nothing moves.
        await asyncio.sleep(12)
        later = [e for e in await registry.events() if e.id > mark]
        assert [(e.model_name, e.node_id, e.to_state.name, e.message) for e in later] == []
        events = [e for e in await registry.events() if e.id > start]
        assert loads_on(events, "node-1") == 1
        assert loads_on(events, "node-0") == 0
        assert copies(await registry.list_placements()) == {
            "enc-0": ["node-0"],
            "enc-2": ["node-0"],
            "enc-3": ["node-1"],
        }


async def test_a_second_process_with_a_live_node_id_refuses_to_start(fleet: Fleet) -> None:
    node = fleet.nodes["node-0"]
    log = node.home / "duplicate.log"
    process = node.spawn_loader(log, MODELPLANE_LOADER_PORT=str(free_port()), MODELPLANE_LOADER_METRICS_PORT="0")
    status = process.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert status != 0, text
    assert "node-0" in text and node.loader in text and "lease expires" in text, text


async def test_a_placement_that_no_node_can_hold_or_that_lacks_labels_is_refused_clearly(
    fleet: Fleet, encoders: dict[str, Path]
) -> None:
    async with RegistryClient(fleet.registry) as registry:
        # The registry refuses a copy on a node without the labels the model's node_selector requires.
        await register(registry, "enc-gpu", encoders["enc-0"], placement=PlacementPolicy(node_selector={"gpu": "h100"}))
        with pytest.raises(InvalidArgument) as refused:
            await registry.set_placements([PlacementTarget(model_name="enc-gpu", node_id="node-0")])
        assert "lacks the labels" in refused.value.message and "gpu=h100" in refused.value.message

        # A model larger than the node's whole budget: the node refuses it with the budget's reason
        # and records that at this generation, so it does not try again until asked anew.
        await register(registry, "enc-huge", encoders["enc-huge"])
        await registry.set_placements([PlacementTarget(model_name="enc-huge", node_id="node-1")])

        async def refused_copy() -> Placement | None:
            found = await registry.list_placements(model_names=["enc-huge"])
            placement = found[0] if found else None
            acted = placement is not None and placement.status.observed_generation == placement.generation
            return placement if acted and placement.status.evicted else None

        placement = await until(refused_copy, "enc-huge refused by node-1", fleet)
        assert "does not fit on node node-1" in placement.status.reason, placement.status.reason
        model = await registry.get_model("enc-huge")
        assert model.state != ModelState.READY
        mark = max(e.id for e in await registry.events("enc-huge"))
        await asyncio.sleep(7)  # a reconciliation round: no second try
        assert [e.message for e in await registry.events("enc-huge") if e.id > mark] == []


async def _only(registry: RegistryClient, expected: dict[str, list[str]]) -> bool:
    placements = await registry.list_placements()
    ready = all(p.status.state == ModelState.READY for p in placements)
    return ready and copies(placements) == expected


async def _not_ready(registry: RegistryClient, name: str) -> Model | None:
    model = await registry.get_model(name)
    return model if model.state != ModelState.READY else None
