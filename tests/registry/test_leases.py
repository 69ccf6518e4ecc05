"""Named leases (the placer's leadership), on SQLite and PostgreSQL: one holder at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from modelplane.common.types import ModelSpec, Task
from modelplane.registry.errors import NotPlacerLeader
from modelplane.registry.fleet import PLACER_LEASE, Node, PlacementTarget
from modelplane.registry.fleet_handlers import FleetHandler
from modelplane.registry.handlers import RegistryHandler
from modelplane.registry.leases import Lease
from modelplane.registry.store import RegistryStore

LONG = timedelta(seconds=30)
SHORT = timedelta(seconds=1)


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[tuple[RegistryStore, RegistryStore]]:
    """Two stores on one database: two registry replicas (SQLite has only ever one, but the rule is
    the same within it)."""
    first = await RegistryStore.open(database_url)
    second = await RegistryStore.open(database_url)
    yield first, second
    await first.close()
    await second.close()


async def take_over(store: RegistryStore, holder: str) -> Lease:
    """Tries for the placer's lease as a waiting replica does, until the holder's has lapsed."""
    for _ in range(100):
        lease = await store.leases.acquire(PLACER_LEASE, holder, LONG)
        if lease is not None:
            return lease
        await asyncio.sleep(0.1)
    raise AssertionError("the lease never lapsed")


async def test_contenders_racing_for_a_free_lease_leave_exactly_one_holder(
    stores: tuple[RegistryStore, RegistryStore],
) -> None:
    contenders = [(stores[i % 2], f"replica-{i}") for i in range(8)]
    won = await asyncio.gather(*(store.leases.acquire(PLACER_LEASE, who, LONG) for store, who in contenders))
    holders = [lease.holder for lease in won if lease is not None]
    assert len(holders) == 1
    recorded = await stores[1].leases.get(PLACER_LEASE)
    assert recorded is not None and (recorded.holder, recorded.term) == (holders[0], 1)


async def test_the_holder_renews_others_wait_and_a_lapsed_lease_changes_hands(
    stores: tuple[RegistryStore, RegistryStore],
) -> None:
    first, second = stores
    taken = await first.leases.acquire(PLACER_LEASE, "replica-a", SHORT)
    assert taken is not None and taken.term == 1
    assert await second.leases.acquire(PLACER_LEASE, "replica-b", SHORT) is None
    renewed = await first.leases.acquire(PLACER_LEASE, "replica-a", SHORT)
    assert renewed is not None and renewed.term == 1 and renewed.expire_time > taken.expire_time
    assert renewed.acquire_time == taken.acquire_time
    # replica-a stops renewing (it hung); once its lease lapses replica-b takes over, in a new term.
    lease = await take_over(second, "replica-b")
    assert (lease.holder, lease.term) == ("replica-b", 2)
    assert await first.leases.acquire(PLACER_LEASE, "replica-a", SHORT) is None


async def test_a_released_lease_is_free_at_once(stores: tuple[RegistryStore, RegistryStore]) -> None:
    first, second = stores
    await first.leases.acquire(PLACER_LEASE, "replica-a", LONG)
    assert not await second.leases.release(PLACER_LEASE, "replica-b")  # not its lease
    assert await first.leases.release(PLACER_LEASE, "replica-a")
    lease = await second.leases.acquire(PLACER_LEASE, "replica-b", LONG)
    assert lease is not None and lease.term == 2


async def test_only_the_leader_writes_placements(stores: tuple[RegistryStore, RegistryStore]) -> None:
    first, second = stores
    await RegistryHandler(first).register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"), load=True)
    fleet = FleetHandler(first)
    await fleet.register_node(Node(node_id="node-0", loader_address="h:1", triton_address="h:2", holder="loader a"))
    target = PlacementTarget(model_name="minilm", node_id="node-0")
    with pytest.raises(NotPlacerLeader, match="'replica-a' does not hold the placer's lease \\(held by nobody\\)"):
        await fleet.set_placements([target], leader_holder="replica-a")
    await first.leases.acquire(PLACER_LEASE, "replica-a", SHORT)
    [placed], _ = await fleet.set_placements([target], leader_holder="replica-a")
    assert placed.generation == 1
    # replica-a's lease lapses and replica-b leads: replica-a's late write is refused.
    await take_over(second, "replica-b")
    with pytest.raises(NotPlacerLeader, match="held by 'replica-b' until"):
        await fleet.set_placements([target.model_copy(update={"redo": True})], leader_holder="replica-a")
    [placement] = await fleet.list_placements()
    assert placement.generation == 1
