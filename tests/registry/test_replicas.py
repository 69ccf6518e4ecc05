"""Several registry replicas on one PostgreSQL database, as on Kubernetes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from modelplane.common.errors import Unavailable
from modelplane.common.types import Model, ModelAsset, ModelSpec, ModelState, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, NodeState, PlacementTarget
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import Change, ChangeType, ModelChange, NodeChange, PlacementChange
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow  # a real PostgreSQL server and two replicas


@pytest.fixture
async def database(postgres: PostgresServer) -> AsyncIterator[str]:
    name = await postgres.create_database()
    yield postgres.url(name)
    await postgres.drop_database(name)


@pytest.fixture
async def replicas(database: str) -> AsyncIterator[tuple[RegistryService, RegistryService]]:
    # Both start at once, as a Deployment's pods do: the migration lock lets one migrate at a time.
    first, second = (
        RegistryService(
            # No placer: these tests write placements themselves (test_placer.py runs two).
            RegistrySettings(
                host="127.0.0.1", port=0, database_url=database, node_sweep_interval_seconds=0.2, placer=False
            )
        )
        for _ in range(2)
    )
    await asyncio.gather(first.start(), second.start())
    yield first, second
    await asyncio.gather(first.stop(), second.stop())


async def test_a_change_written_through_one_replica_reaches_a_watcher_of_the_other(
    replicas: tuple[RegistryService, RegistryService],
) -> None:
    first, second = replicas
    async with (
        RegistryClient(f"127.0.0.1:{first.port}") as watcher_side,
        RegistryClient(f"127.0.0.1:{second.port}") as writer_side,
    ):
        # A model registered before the watch starts is in its snapshot, never in its stream.
        await writer_side.register(ModelSpec(name="earlier", task=Task.EMBEDDING, source_uri="/m/earlier"))
        seen: list[ModelChange] = []
        snapshot: list[str] = []
        watching = asyncio.Event()

        async def follow() -> None:
            async for change in watcher_side.watch(include_initial=True):
                if change.change_type == ChangeType.INITIAL:
                    snapshot.append(change.model.name)
                    watching.set()
                    continue
                seen.append(change)
                if len(seen) == 3:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(watching.wait(), timeout=10)
        model, _ = await writer_side.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m/minilm"))
        await writer_side.transition(model, ModelState.FETCHING, "fetching on the other replica")
        await writer_side.delete("earlier")
        await asyncio.wait_for(follower, timeout=10)

    assert snapshot == ["earlier"]
    assert [(c.change_type, c.model.name) for c in seen] == [
        (ChangeType.REGISTERED, "minilm"),
        (ChangeType.UPDATED, "minilm"),
        (ChangeType.DELETED, "earlier"),
    ]
    assert seen[1].model.state == ModelState.FETCHING
    assert seen[1].event is not None and seen[1].event.message == "fetching on the other replica"


async def test_watchers_resync_when_the_listen_connection_drops(
    replicas: tuple[RegistryService, RegistryService], postgres: PostgresServer, database: str
) -> None:
    first, second = replicas
    async with (
        RegistryClient(f"127.0.0.1:{first.port}") as watcher_side,
        RegistryClient(f"127.0.0.1:{second.port}") as writer_side,
    ):
        await writer_side.register(ModelSpec(name="before", task=Task.EMBEDDING, source_uri="/m/before"))
        stream = watcher_side.watch(include_initial=True)
        assert (await anext(stream)).model.name == "before"
        # A PostgreSQL failover or a network blip cuts every connection of both replicas.
        admin = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="modelplane", database="postgres")
        try:
            cut = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
                database.rsplit("/", 1)[1],
            )
        finally:
            await admin.close()
        assert cut >= 2  # at least the two LISTEN connections
        # Changes sent meanwhile are lost to that replica, so its watchers are ended to resync
        # rather than left silently behind.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), timeout=10)
        # Until it listens again a new watch is refused as retryable; then it works as before.
        refusals: list[str] = []
        first_change: ModelChange | None = None
        for _ in range(100):
            stream = watcher_side.watch(include_initial=True)
            try:
                first_change = await anext(stream)
                break
            except Unavailable as refused:
                refusals.append(refused.message)
                await asyncio.sleep(0.2)
        assert first_change is not None, f"the replica never listened again: {refusals[-1:]}"
        assert first_change.model.name == "before"
        assert all("retry the watch shortly" in message for message in refusals), refusals
        await writer_side.register(ModelSpec(name="after", task=Task.EMBEDDING, source_uri="/m/after"))
        change = await asyncio.wait_for(anext(stream), timeout=10)
        assert (change.change_type, change.model.name) == (ChangeType.REGISTERED, "after")


async def test_two_models_that_share_an_asset_record_it_at_once(postgres: PostgresServer, database: str) -> None:
    """Two loads recording the same file (a tokenizer many models share) for two models, each in its
    transaction as TransitionPlacement records it: the second waits on the first's new row and then
    finds it there, rather than failing on the key (an INTERNAL error that fails the load)."""
    store = await RegistryStore.open(database)
    content = b"[PAD]\n[UNK]\n"
    shared = ModelAsset(name="vocab.txt", sha256=hashlib.sha256(content).hexdigest(), content=content)

    async def record(name: str) -> None:
        async with store.engine.begin() as connection:
            await store.replace_assets(connection, name, [shared])

    admin = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="modelplane", database="postgres")
    try:
        async with store.engine.begin() as first:
            await store.replace_assets(first, "enc-0", [shared])
            second = asyncio.create_task(record("enc-1"))
            # The second transaction has not seen the first's row and waits on its key.
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
            while not await admin.fetchval(query, database.rpartition("/")[2]):
                assert not second.done(), second
                await asyncio.sleep(0.05)
        await second
        assert await store.get_assets("enc-0") == [shared]
        assert await store.get_assets("enc-1") == [shared]
    finally:
        await admin.close()
        await store.close()


async def test_a_model_deleted_while_another_records_its_shared_asset_leaves_the_asset(
    postgres: PostgresServer, database: str
) -> None:
    """The last model holding a shared file (a tokenizer) is deleted on one replica while a load on
    another records the same file for a second model, in a transaction not committed yet: the
    delete's sweep of unreferenced files must not take the file the second model now refers to
    (it cannot see that reference until it commits, so it waits for it)."""
    store = await RegistryStore.open(database)
    content = b"[PAD]\n[UNK]\n"
    shared = ModelAsset(name="vocab.txt", sha256=hashlib.sha256(content).hexdigest(), content=content)
    spec = ModelSpec(name="old", task=Task.EMBEDDING, source_uri="/m/old")
    await store.register_model("old", lambda _: (Model(spec=spec), True, None, ChangeType.REGISTERED))
    async with store.engine.begin() as connection:
        await store.replace_assets(connection, "old", [shared])
    admin = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="modelplane", database="postgres")
    try:
        async with store.engine.begin() as recording:
            await store.replace_assets(recording, "new", [shared])
            deleting = asyncio.create_task(store.delete_model("old"))
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
            for _ in range(100):  # the delete either waits for the recording transaction or is done
                if deleting.done() or await admin.fetchval(query, database.rpartition("/")[2]):
                    break
                await asyncio.sleep(0.05)
        await deleting
        assert await store.get_model("old") is None
        assert await store.get_assets("new") == [shared]
    finally:
        await admin.close()
        await store.close()


async def test_registrations_through_both_replicas_at_once_number_versions_without_gaps_or_doubles(
    replicas: tuple[RegistryService, RegistryService],
) -> None:
    first, second = replicas
    async with (
        RegistryClient(f"127.0.0.1:{first.port}") as one,
        RegistryClient(f"127.0.0.1:{second.port}") as other,
    ):
        # 16 new packages of one model, and one new model registered twice with the same package,
        # all at the same moment, half through each replica.
        clients = [one, other] * 8
        results = await asyncio.gather(
            *(
                client.register(ModelSpec(name="busy", task=Task.EMBEDDING, source_uri=f"/m/busy-{index}"))
                for index, client in enumerate(clients)
            ),
            one.register(ModelSpec(name="fresh", task=Task.EMBEDDING, source_uri="/m/fresh")),
            other.register(ModelSpec(name="fresh", task=Task.EMBEDDING, source_uri="/m/fresh")),
        )
        busy, fresh = results[:16], results[16:]
        assert sorted(model.version for model, created in busy if created) == list(range(1, 17))
        assert (await other.get_model("busy")).version == 16
        events = await one.events("busy")
        assert sorted(e.version for e in events) == list(range(1, 17))
        assert sorted(created for _, created in fresh) == [False, True]
        assert {model.version for model, _ in fresh} == {1}


async def test_node_and_placement_changes_reach_a_watcher_of_the_other_replica(
    replicas: tuple[RegistryService, RegistryService],
) -> None:
    first, second = replicas
    async with (
        RegistryClient(f"127.0.0.1:{first.port}") as watcher_side,
        RegistryClient(f"127.0.0.1:{second.port}") as writer_side,
    ):
        await writer_side.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m/minilm"))
        stream = watcher_side.watch_fleet(include_initial=True)
        assert isinstance(await anext(stream), ModelChange)  # the snapshot: subscribed from here on
        node_0 = Node(node_id="node-0", loader_address="10.0.0.5:50052", triton_address="10.0.0.5:8001", holder="a")
        node = await writer_side.register_node(node_0, lease_duration=timedelta(seconds=60))
        [placement], _ = await writer_side.set_placements([PlacementTarget(model_name="minilm", node_id="node-0")])
        for state in (ModelState.FETCHING, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING):
            await writer_side.transition_placement(placement, node.incarnation, state)
        await writer_side.transition_placement(placement, node.incarnation, ModelState.READY, observed_generation=1)
        # The same process shortens its lease, then stops renewing it (it hung, or was killed).
        assert (await writer_side.register_node(node_0, lease_duration=timedelta(seconds=1))).incarnation == 1

        seen: list[Change] = []
        while True:
            seen.append(await asyncio.wait_for(anext(stream), timeout=10))
            if isinstance(seen[-1], NodeChange) and seen[-1].node.state == NodeState.LOST:
                break
        placements = [c.placement for c in seen if isinstance(c, PlacementChange)]
        assert [p.status.state for p in placements] == [
            ModelState.REGISTERED,
            ModelState.FETCHING,
            ModelState.VERIFYING,
            ModelState.STAGED,
            ModelState.LOADING,
            ModelState.READY,
        ]
        models = [c.model for c in seen if isinstance(c, ModelChange)]
        assert ModelState.READY in [m.state for m in models]
        nodes = [(c.change_type, c.node.state) for c in seen if isinstance(c, NodeChange)]
        assert nodes == [
            (ChangeType.REGISTERED, NodeState.LIVE),
            (ChangeType.UPDATED, NodeState.LIVE),  # the shorter lease
            (ChangeType.UPDATED, NodeState.LOST),
        ]
        after = await asyncio.wait_for(anext(stream), timeout=10)
        assert isinstance(after, ModelChange) and after.model.state == ModelState.REGISTERED
        assert after.model.status.reason == "not held by any live node"
        # Both replicas sweep several times a second; the loss was recorded and announced once:
        # the next change is the one written after a few more sweeps.
        await asyncio.sleep(1.0)
        await writer_side.drain_node("node-0")
        drained = await asyncio.wait_for(anext(stream), timeout=10)
        assert isinstance(drained, NodeChange) and drained.node.draining
        await stream.aclose()
