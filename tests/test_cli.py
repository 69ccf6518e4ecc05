"""`modelplane nodes ls` and `modelplane models ls`, run as an operator runs them, against a real
registry (SQLite) with two nodes; no loader answers, as on a fleet whose loaders are elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeDevice, PlacementTarget
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from tests.conftest import free_port

GIB = 1 << 30


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[str]:
    """A registry holding two nodes: node-0 with a READY copy of minilm, node-1 loading one."""
    # No placer: the test writes the placements itself, as a placer would.
    service = RegistryService(
        RegistrySettings(
            host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", placer=False
        )
    )
    await service.start()
    address = f"127.0.0.1:{service.port}"
    async with RegistryClient(address) as client:
        await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m/minilm"), load=True)
        await client.register(ModelSpec(name="unplaced", task=Task.EMBEDDING, source_uri="/m/unplaced"))
        nodes = []
        for index in range(2):
            cpu = NodeDevice(device="cpu", capacity_bytes=8 * GIB, used_bytes=(index + 1) * GIB)
            nodes.append(
                await client.register_node(
                    Node(
                        node_id=f"node-{index}",
                        loader_address=f"127.0.0.1:{27052 + 10 * index}",
                        triton_address=f"127.0.0.1:{27001 + 10 * index}",
                        holder=f"loader@test pid {index}",
                        devices=[cpu],
                    ),
                    lease_duration=timedelta(minutes=5),
                )
            )
        placements, _ = await client.set_placements(
            [PlacementTarget(model_name="minilm", node_id=n.node_id) for n in nodes]
        )
        steps = (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING, ModelState.READY)
        for state in steps:
            await client.transition_placement(placements[0], nodes[0].incarnation, state)
        await client.transition_placement(placements[1], nodes[1].incarnation, ModelState.FETCHING)
    yield address
    await service.stop()


async def cli(address: str, *args: str) -> str:
    env = {**os.environ, "MODELPLANE_CLI_REGISTRY": address, "COLUMNS": "200"}
    env["MODELPLANE_CLI_LOADER"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelplane.cli", *args, env=env, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    assert process.returncode == 0
    return output.decode()


async def test_nodes_ls_shows_state_lease_budgets_and_models_held(fleet: str) -> None:
    listing = await cli(fleet, "nodes", "ls")
    rows = {line.split("│")[1].strip(): line for line in listing.splitlines() if line.count("│") > 3}
    assert "LIVE" in rows["node-0"] and "renewed" in rows["node-0"] and "ago" in rows["node-0"]
    assert "cpu: 1.0 GiB / 7.0 GiB" in rows["node-0"] and "minilm:READY" in rows["node-0"]
    assert "cpu: 2.0 GiB / 6.0 GiB" in rows["node-1"] and "minilm:FETCHING" in rows["node-1"]

    nodes = json.loads(await cli(fleet, "nodes", "ls", "--json"))
    assert [n["node_id"] for n in nodes] == ["node-0", "node-1"]
    first = nodes[0]
    assert (first["state"], first["incarnation"], first["loader_address"]) == ("LIVE", 1, "127.0.0.1:27052")
    assert 0 <= first["lease_age_seconds"] < first["lease_expires_in_seconds"] <= 300
    assert first["devices"] == [
        {"device": "cpu", "capacity_bytes": 8 * GIB, "used_bytes": GIB, "total_bytes": 0, "product": "",
         "free_bytes": 7 * GIB}
    ]  # fmt: skip
    assert [(m["name"], m["state"], m["generation"]) for m in first["models"]] == [("minilm", "READY", 1)]


async def test_models_ls_shows_where_each_model_is_and_how_many_copies(fleet: str) -> None:
    listing = await cli(fleet, "models", "ls")
    rows = {line.split("│")[1].strip(): line for line in listing.splitlines() if line.count("│") > 3}
    columns = [cell.strip() for cell in rows["minilm"].split("│")]
    assert columns[3] == "READY" and columns[8] == "1/2" and columns[9] == "node-0, node-1:FETCHING"
    assert [cell.strip() for cell in rows["unplaced"].split("│")][8:10] == ["-", "-"]

    listed = json.loads(await cli(fleet, "models", "ls", "--json"))
    assert listed["budget"] is None  # no loader answered
    models = {m["name"]: m for m in listed["models"]}
    assert models["minilm"]["state"] == "READY"
    assert models["minilm"]["copies"] == {"ready": 1, "placed": 2}
    assert [(n["node_id"], n["state"], n["ready"]) for n in models["minilm"]["nodes"]] == [
        ("node-0", "READY", True),
        ("node-1", "FETCHING", False),
    ]
    assert models["unplaced"]["copies"] == {"ready": 0, "placed": 0}
    assert models["unplaced"]["state"] == "REGISTERED"


async def test_nodes_ls_on_a_single_node_says_there_is_no_fleet(tmp_path: Path) -> None:
    service = RegistryService(
        RegistrySettings(host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    )
    await service.start()
    try:
        listing = await cli(f"127.0.0.1:{service.port}", "nodes", "ls")
        assert "No nodes are registered: this is a single node" in listing
        assert json.loads(await cli(f"127.0.0.1:{service.port}", "nodes", "ls", "--json")) == []
    finally:
        await service.stop()
