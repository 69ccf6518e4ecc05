"""`modelplane nodes drain NODE --wait`, as a pod's preStop hook runs it: it returns once every model
the node serves is READY on another live node, and fails, naming the models, when that cannot
happen or does not happen in time. Against a real registry (SQLite) with two nodes and no placer:
the test moves the copies as the placer and the loaders would."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeState, Placement, PlacementTarget
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings

READY_STEPS = (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING, ModelState.READY)


@dataclass
class Fleet:
    address: str
    client: RegistryClient
    nodes: list[Node]
    placements: dict[tuple[str, str], Placement]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """node-0 serves minilm (READY); node-1 holds a copy of it still fetching. A second model,
    bge, is placed only on node-1 and FAILED there."""
    service = RegistryService(
        RegistrySettings(
            host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", placer=False
        )
    )
    await service.start()
    address = f"127.0.0.1:{service.port}"
    async with RegistryClient(address) as client:
        for name in ("minilm", "bge"):
            await client.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"/m/{name}"), load=True)
        nodes = [
            await client.register_node(
                Node(
                    node_id=f"node-{index}",
                    loader_address=f"10.0.0.{index + 1}:50052",
                    triton_address=f"10.0.0.{index + 1}:8001",
                    holder=f"loader@test pid {index}",
                ),
                lease_duration=timedelta(minutes=5),
            )
            for index in range(2)
        ]
        targets = [PlacementTarget(model_name="minilm", node_id=n.node_id) for n in nodes]
        placed, _ = await client.set_placements([*targets, PlacementTarget(model_name="bge", node_id="node-1")])
        placements = {p.key: p for p in placed}
        for state in READY_STEPS:
            await client.transition_placement(placements["minilm", "node-0"], nodes[0].incarnation, state)
        await client.transition_placement(placements["minilm", "node-1"], nodes[1].incarnation, ModelState.FETCHING)
        await client.transition_placement(placements["bge", "node-1"], nodes[1].incarnation, ModelState.FETCHING)
        await client.transition_placement(placements["bge", "node-1"], nodes[1].incarnation, ModelState.FAILED)
        yield Fleet(address, client, nodes, placements)
    await service.stop()


async def start_cli(address: str, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelplane.cli",
        *args,
        env={**os.environ, "MODELPLANE_CLI_REGISTRY": address, "COLUMNS": "200", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    _, errors = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, " ".join(errors.decode().split())  # rich wraps long lines


async def test_wait_returns_once_every_model_the_node_serves_is_ready_elsewhere(fleet: Fleet) -> None:
    # As in a pod's preStop hook: the node id comes from MODELPLANE_NODE_ID (the downward API).
    process = await start_cli(
        fleet.address, "nodes", "drain", "--wait", "--timeout", "90", env={"MODELPLANE_NODE_ID": "node-0"}
    )
    assert process.stderr is not None
    seen = ""
    while "waiting for a READY copy elsewhere of minilm" not in seen:  # it looked, and minilm is only here
        line = await asyncio.wait_for(process.stderr.readline(), timeout=120)
        assert line, f"the drain ended before minilm was READY elsewhere: {seen}"
        seen += line.decode()
    assert process.returncode is None
    assert (await fleet.client.list_nodes(node_ids=["node-0"]))[0].state == NodeState.DRAINING

    copy = fleet.placements["minilm", "node-1"]
    for state in READY_STEPS[1:]:
        await fleet.client.transition_placement(copy, fleet.nodes[1].incarnation, state)
    code, errors = await finish(process)

    assert code == 0, errors
    assert "node-0: DRAINING" in seen
    assert "node-0: drained; every model it served is READY on another node" in errors


async def test_wait_gives_up_after_the_timeout_and_names_what_did_not_move(fleet: Fleet) -> None:
    code, errors = await finish(await start_cli(fleet.address, "nodes", "drain", "node-0", "--wait", "--timeout", "1"))
    assert code == 1
    assert "after 1 s, minilm still had no READY copy but on node-0" in errors
    assert "raise --timeout and the pod's terminationGracePeriodSeconds" in errors
    # The drain itself stays: the node takes no new copies while it goes.
    assert (await fleet.client.list_nodes(node_ids=["node-0"]))[0].state == NodeState.DRAINING


async def test_wait_fails_at_once_when_no_other_live_node_could_take_the_copies(fleet: Fleet) -> None:
    await fleet.client.drain_node("node-1")
    code, errors = await finish(
        await start_cli(fleet.address, "nodes", "drain", "node-0", "--wait", "--timeout", "600")
    )
    assert code == 1
    assert "node-0 is the only live node that is not draining, so nothing can take its copies of minilm" in errors


async def test_a_node_serving_nothing_alone_is_drained_at_once(fleet: Fleet) -> None:
    # node-1's copies are not READY (one fetching, one FAILED): leaving loses nothing.
    code, errors = await finish(await start_cli(fleet.address, "nodes", "drain", "node-1", "--wait"))
    assert code == 0, errors
    assert "node-1: drained" in errors


async def test_wait_with_cancel_is_refused_and_the_node_is_left_as_it_was(fleet: Fleet) -> None:
    code, errors = await finish(await start_cli(fleet.address, "nodes", "drain", "node-0", "--cancel", "--wait"))
    assert code == 2
    assert "--wait waits for a drain to finish; it cannot go with --cancel" in errors
    assert (await fleet.client.list_nodes(node_ids=["node-0"]))[0].state == NodeState.LIVE
