"""The fleet on real PostgreSQL with two registry replicas (tests/integration/fleet.py): both run a
placer on one database, one at a time leads (the "placer" lease); two nodes, each a real
tritonserver and a real loader in fleet mode whose registry address names both replicas; small
real-architecture BERT encoders as the models, and a host budget per node that holds two of them
(test_fleet.py's). Nothing here places a copy by hand.

Models registered through the replica that does not lead are placed by the one that does and
become READY on the nodes, none over its budget; the leader SIGKILLed (no release: its lease must
lapse), the other replica takes the lease over, the nodes keep their registry (their channel moves
to the surviving address) and their incarnation, and a model registered after the kill is placed
and READY. The takeover's seconds are printed (run with -s to see them).

What costs time: two tritonservers started, four tiny encoders loaded, one placer lease of 3 s
lapsing; about a minute on a quiet 2-core machine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import PLACER_LEASE, NodeState
from modelplane.registry.leases import Lease
from modelplane.registry.store import RegistryStore
from tests.encoders import save_tiny_bert
from tests.integration.fleet import Fleet, Replica, all_ready, copies, register, running_fleet, until
from tests.integration.test_fleet import NODE_ENV
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow

PLACER_LEASE_SECONDS = 3.0
REGISTRY_ENV = {
    "MODELPLANE_REGISTRY_PLACER": "true",
    "MODELPLANE_REGISTRY_PLACER_INTERVAL_SECONDS": "0.5",
    "MODELPLANE_REGISTRY_PLACER_LEASE_SECONDS": str(PLACER_LEASE_SECONDS),
}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replica-encoders")
    return {f"enc-{i}": save_tiny_bert(root / f"enc-{i}", minilm_path, seed=300 + i) for i in range(4)}


@pytest.fixture(scope="module")
async def store(postgres: PostgresServer) -> AsyncIterator[RegistryStore]:
    """A database of its own, migrated before either replica starts; the tests read its placer
    lease to know which replica leads."""
    name = await postgres.create_database()
    opened = await RegistryStore.open(postgres.url(name))
    yield opened
    await opened.close()
    await postgres.drop_database(name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, store: RegistryStore) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-postgres")
    url = store.engine.url.render_as_string(hide_password=False)
    with running_fleet(home, 2, database_url=url, replicas=2, registry_env=REGISTRY_ENV, **NODE_ENV) as running:
        yield running


async def _leader(store: RegistryStore, fleet: Fleet) -> tuple[Replica, Lease] | None:
    """The running replica that holds the placer lease, and the lease."""
    lease = await store.leases.get(PLACER_LEASE)
    for replica in fleet.replicas:
        if lease is not None and f" pid {replica.process.pid} " in lease.holder and replica.process.poll() is None:
            return replica, lease
    return None


async def _nodes_within_budget(registry: RegistryClient) -> dict[str, list[str]]:
    """Each node's copies, after checking that every node's budget holds them (used ≤ capacity)."""
    for node in await registry.list_nodes():
        for device in node.devices:
            assert 0 < device.used_bytes <= device.capacity_bytes, (node.node_id, device)
    held: dict[str, list[str]] = {}
    for placement in await registry.list_placements():
        held.setdefault(placement.node_id, []).append(placement.model_name)
    assert all(len(names) <= 2 for names in held.values()), held
    return held


async def test_models_registered_through_one_replica_are_placed_by_the_leader(
    fleet: Fleet, store: RegistryStore, encoders: dict[str, Path]
) -> None:
    names = ["enc-0", "enc-1", "enc-2"]
    leader, lease = await until(lambda: _leader(store, fleet), "a replica leads", fleet, limit=60)
    [follower] = [r for r in fleet.replicas if r is not leader]
    async with RegistryClient(follower.address) as through_follower:
        for name in names:
            await register(through_follower, name, encoders[name])
    async with RegistryClient(fleet.registry) as registry:
        await until(lambda: all_ready(registry, names), "three models READY", fleet)
        # Placed by the replica that led throughout: only the lease's holder may write placements.
        still, renewed = await until(lambda: _leader(store, fleet), "a replica leads", fleet, limit=60)
        assert (still, renewed.holder, renewed.term) == (leader, lease.holder, lease.term)
        where = copies(await registry.list_placements(names))
        assert sorted(where) == names and all(len(nodes) == 1 for nodes in where.values()), where
        held = await until(lambda: _budgets_reported(registry), "budgets renewed with the copies", fleet, limit=30)
        assert sorted(len(names) for names in held.values()) == [1, 2], held


async def _budgets_reported(registry: RegistryClient) -> dict[str, list[str]] | None:
    nodes = await registry.list_nodes()
    used = [d.used_bytes for n in nodes for d in n.devices]
    return await _nodes_within_budget(registry) if used and all(u > 0 for u in used) else None


async def test_the_other_replica_takes_over_placing_when_the_leader_is_killed(
    fleet: Fleet, store: RegistryStore, encoders: dict[str, Path]
) -> None:
    leader, lease = await until(lambda: _leader(store, fleet), "a replica leads", fleet, limit=60)
    [survivor] = [r for r in fleet.replicas if r is not leader]
    async with RegistryClient(fleet.registry) as registry:
        before = {n.node_id: n.incarnation for n in await registry.list_nodes()}

        killed = time.monotonic()
        leader.process.kill()  # no release: its lease must lapse
        leader.process.wait()
        new_leader, new_lease = await until(lambda: _leader(store, fleet), "the survivor leads", fleet, limit=60)
        took_over = time.monotonic() - killed
        assert new_leader is survivor and new_lease.term > lease.term

        async with RegistryClient(survivor.address) as through_survivor:
            await register(through_survivor, "enc-3", encoders["enc-3"])
        await until(lambda: all_ready(registry, [f"enc-{i}" for i in range(4)]), "enc-3 READY", fleet)
        ready_after = time.monotonic() - killed
        held = await until(lambda: _budgets_reported(registry), "budgets renewed with the copies", fleet, limit=30)
        nodes = {n.node_id: n for n in await registry.list_nodes()}

    # A channel to several addresses uses the first that answers: the nodes' registry was the first replica.
    whose = "the nodes' registry until then" if leader is fleet.replicas[0] else "not the nodes' registry"
    print(
        f"\nplacer leader at {leader.address} ({whose}) SIGKILLed: the replica at {survivor.address} took the "
        f"lease over {took_over:.1f} s later (lease {PLACER_LEASE_SECONDS:g} s, interval 0.5 s); enc-3, registered "
        f"then, READY {ready_after:.1f} s after the kill; copies per node {held}"
    )
    assert sorted(len(names) for names in held.values()) == [2, 2], held
    # The nodes kept their registry through the other address: never LOST, never registered anew.
    assert {n: (node.state, node.incarnation) for n, node in nodes.items()} == {
        n: (NodeState.LIVE, incarnation) for n, incarnation in before.items()
    }
