"""Persistence of the fleet: nodes and placements, on the registry store's engine and transactions.

Like the rest of the store, each method is one transaction and the rules come from the caller
(fleet_handlers.py) as functions applied to the rows inside it. What only the store can do is
here: reading and locking the rows in one order, deriving the status of every model whose copies
a write touched (fleet.derive_status), and announcing every change on commit.

Rows are locked in one order everywhere, so concurrent writers on PostgreSQL wait for each other
rather than deadlock: nodes, then models (by name), then placements.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from modelplane.common.types import Model, ModelAsset, ModelEvent
from modelplane.registry import schema
from modelplane.registry.errors import NotPlacerLeader
from modelplane.registry.fleet import (
    PLACER_LEASE,
    Node,
    NodeState,
    Placement,
    PlacementScope,
    PlacementWrites,
    derive_status,
    removal_event,
)
from modelplane.registry.rows import (
    model_from_row,
    node_from_row,
    node_values,
    placement_from_row,
    placement_values,
)
from modelplane.registry.watch import ChangeType, ModelChange, NodeChange, PlacementChange

if TYPE_CHECKING:
    from modelplane.registry.store import RegistryStore, Write

# Decides a node's new row from its current one (None when new) at the database's time; may raise.
NodeDecision = Callable[[Node | None, datetime], Node]
# Decides a placement transition: from the model, the node, the placement (None when missing) at
# the database's time, the placement after it, the model with what the load established, and the
# event. May raise to refuse.
PlacementDecision = Callable[
    [Model | None, Node | None, Placement | None, datetime], tuple[Placement, Model, ModelEvent | None]
]


class FleetStore:
    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    # Reading ------------------------------------------------------------------------------------

    async def list_nodes(self, node_ids: Collection[str] = (), states: Collection[NodeState] = ()) -> list[Node]:
        """Nodes ordered by id, each with its state as of now (a lapsed lease reads LOST at once,
        before the sweep records it)."""
        query = sa.select(schema.nodes).order_by(schema.nodes.c.node_id)
        if node_ids:
            query = query.where(schema.nodes.c.node_id.in_(list(node_ids)))
        async with self._store.engine.connect() as connection:
            now = await self._store.now(connection)
            rows = (await connection.execute(query)).all()
        nodes = [node_from_row(row).observed(now) for row in rows]
        return [n for n in nodes if n.state in states] if states else nodes

    async def list_placements(
        self, model_names: Collection[str] = (), node_ids: Collection[str] = ()
    ) -> list[Placement]:
        table = schema.placements
        query = sa.select(table).order_by(table.c.model_name, table.c.node_id)
        if model_names:
            query = query.where(table.c.model_name.in_(list(model_names)))
        if node_ids:
            query = query.where(table.c.node_id.in_(list(node_ids)))
        async with self._store.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [placement_from_row(row) for row in rows]

    async def nodes_holding(self, connection: AsyncConnection, model_name: str) -> list[str]:
        """Within a transaction: the ids of the nodes a model is placed on."""
        table = schema.placements
        query = sa.select(table.c.node_id).where(table.c.model_name == model_name).order_by(table.c.node_id)
        return list((await connection.execute(query)).scalars())

    # Nodes --------------------------------------------------------------------------------------

    async def write_node(self, node_id: str, decide: NodeDecision) -> Node:
        """Reads a node, applies `decide` (which may raise to refuse) and writes the result. A new
        incarnation is announced as REGISTERED; a change other than the lease's expiry as
        UPDATED; a renewal that changes nothing else is not announced."""
        async with self._store.write() as write:
            connection = write.connection
            await self._store.lock(connection, "node", node_id)
            now = await self._store.now(connection)
            row = (
                await connection.execute(
                    sa.select(schema.nodes).where(schema.nodes.c.node_id == node_id).with_for_update()
                )
            ).first()
            current = node_from_row(row).observed(now) if row else None
            node = decide(current, now).observed(now)
            values = node_values(node, now)
            if row is None:
                await connection.execute(sa.insert(schema.nodes).values(node_id=node_id, **values))
            else:
                await connection.execute(
                    sa.update(schema.nodes).where(schema.nodes.c.node_id == node_id).values(**values)
                )
            if current is None or current.incarnation != node.incarnation:
                write.changes.append(NodeChange(ChangeType.REGISTERED, node))
            elif _without_lease_times(current) != _without_lease_times(node):
                write.changes.append(NodeChange(ChangeType.UPDATED, node))
            lost = (current is not None and current.state == NodeState.LOST, node.state == NodeState.LOST)
            if current is not None and (current.incarnation != node.incarnation or lost[0] != lost[1]):
                # A new process, or the lease lost: the copies' states written before say nothing now.
                await self._derive(write, await self._models_on(connection, [node_id]), now)
        return node

    async def delete_node(self, node_id: str, check: Callable[[Node | None, datetime], None]) -> Node:
        """Deletes a node and its placements once `check` allows it (it may raise)."""
        async with self._store.write() as write:
            connection = write.connection
            now = await self._store.now(connection)
            row = (
                await connection.execute(
                    sa.select(schema.nodes).where(schema.nodes.c.node_id == node_id).with_for_update()
                )
            ).first()
            node = node_from_row(row).observed(now) if row else None
            check(node, now)
            assert node is not None
            names = await self._models_on(connection, [node_id])
            placements = await self._placements(connection, names, lock=True)
            gone = [p for p in placements.values() if p.node_id == node_id]
            await self._remove(write, gone, now, why=f"node '{node_id}' was deleted")
            await connection.execute(sa.delete(schema.nodes).where(schema.nodes.c.node_id == node_id))
            write.changes.append(NodeChange(ChangeType.DELETED, node))
            await self._derive(write, names, now)
        return node

    async def mark_lost_nodes(self) -> list[Node]:
        """Records as LOST every node whose lease has lapsed since the last sweep, announces it, and
        derives again the status of the models with copies on it. Every replica may sweep: a row
        another replica is recording is skipped, and one already recorded is not found again."""
        table = schema.nodes
        lapsed = (table.c.state != int(NodeState.LOST), table.c.lease_expire_time <= sa.bindparam("now"))
        # Every replica sweeps every second and almost always finds nothing: a read says whether a
        # write transaction is needed at all.
        async with self._store.engine.connect() as connection:
            now = await self._store.now(connection)
            count = sa.select(sa.func.count()).select_from(table).where(*lapsed)
            if not (await connection.execute(count, {"now": now})).scalar_one():
                return []
        async with self._store.write() as write:
            connection = write.connection
            now = await self._store.now(connection)
            rows = (
                await connection.execute(
                    sa.select(table).where(*lapsed).order_by(table.c.node_id).with_for_update(skip_locked=True),
                    {"now": now},
                )
            ).all()
            lost = [node_from_row(row).observed(now) for row in rows]
            for node in lost:
                await connection.execute(
                    sa.update(table).where(table.c.node_id == node.node_id).values(**node_values(node, now))
                )
                write.changes.append(NodeChange(ChangeType.UPDATED, node))
            if lost:
                await self._derive(write, await self._models_on(connection, [n.node_id for n in lost]), now)
        return lost

    async def next_lease_expiry(self) -> float | None:
        """Seconds until the earliest lease of a node not yet recorded LOST runs out (0 or less when
        one has run out already); None when every node is recorded LOST, or there is none."""
        table = schema.nodes
        query = (
            sa.select(table).where(table.c.state != int(NodeState.LOST)).order_by(table.c.lease_expire_time).limit(1)
        )
        async with self._store.engine.connect() as connection:
            now = await self._store.now(connection)
            row = (await connection.execute(query)).first()
        expiry = node_from_row(row).lease_expire_time if row else None
        return (expiry - now).total_seconds() if expiry is not None else None

    # Placements -------------------------------------------------------------------------------

    async def set_placements(
        self,
        node_ids: Collection[str],
        model_names: Collection[str],
        decide: Callable[[PlacementScope], PlacementWrites],
        *,
        leader: str = "",
    ) -> PlacementWrites:
        """Applies one batch of the placer's writes in one transaction. `decide` sees the nodes,
        models and placements involved (locked) and returns what to write; when `leader` is given
        the batch is written only while it holds the placer's lease."""
        async with self._store.write() as write:
            connection = write.connection
            now = await self._store.now(connection)
            if leader and await self._store.leases.held(connection, PLACER_LEASE, leader, now) is None:
                current = await self._store.leases.get(PLACER_LEASE)
                holder = (
                    f"'{current.holder}' until {current.expire_time.isoformat(timespec='seconds')}"
                    if current and current.valid(now)
                    else "nobody"
                )
                raise NotPlacerLeader(
                    f"'{leader}' does not hold the placer's lease (held by {holder}); only the placer writes "
                    "placements. Acquire the lease first, and stop placing when it is lost.",
                    metadata={"holder": current.holder if current else ""},
                )
            nodes = await self._nodes(connection, node_ids)
            models = await self._models(connection, model_names)
            placements = await self._placements(connection, model_names, lock=True)
            writes = decide(PlacementScope(models=models, nodes=nodes, placements=placements, now=now))
            for placement in writes.upserts:
                existed = placement.key in placements
                await self._put_placement(connection, placement, exists=existed)
                write.changes.append(
                    PlacementChange(ChangeType.UPDATED if existed else ChangeType.REGISTERED, placement)
                )
            await self._remove(write, writes.removals, now)
            for event in writes.events:
                await self._store.insert_event(connection, event, now)
            await self._derive(write, {p.model_name for p in [*writes.upserts, *writes.removals]}, now)
        return writes

    async def transition_placement(
        self,
        model_name: str,
        node_id: str,
        decide: PlacementDecision,
        *,
        assets: Sequence[ModelAsset] | None = None,
    ) -> tuple[Placement, Model, ModelEvent | None]:
        """Applies one transition of a copy, reported by its node's loader: `decide` checks the
        caller still holds the node and returns the placement after it; the model's status is
        derived again from its copies in the same transaction."""
        async with self._store.write() as write:
            connection = write.connection
            now = await self._store.now(connection)
            node = (await self._nodes(connection, [node_id])).get(node_id)
            model = (await self._models(connection, [model_name])).get(model_name)
            placement = (await self._placements(connection, [model_name], lock=True)).get((model_name, node_id))
            updated, base, event = decide(model, node, placement, now)
            await self._put_placement(connection, updated, exists=True)
            write.changes.append(PlacementChange(ChangeType.UPDATED, updated))
            if assets is not None and updated.version == base.version:
                # Assets belong to the model's current version; a copy of another one keeps them.
                await self._store.replace_assets(connection, model_name, assets)
            if event is not None:
                event = await self._store.insert_event(connection, event, now)
            derived = await self._derive(write, [model_name], now, bases={model_name: base}, event=event)
        return updated, derived.get(model_name, base), event

    async def remove_placements_of_model(self, write: Write, model_name: str) -> None:
        """Within the transaction deleting a model: its placements go with it."""
        placements = await self._placements(write.connection, [model_name], lock=True)
        for placement in placements.values():
            await write.connection.execute(_where_key(sa.delete(schema.placements), placement))
            write.changes.append(PlacementChange(ChangeType.DELETED, placement))

    # Within a transaction -----------------------------------------------------------------------

    async def _nodes(self, connection: AsyncConnection, node_ids: Iterable[str]) -> dict[str, Node]:
        """Nodes by id, locked against re-registration (FOR SHARE) until the transaction ends."""
        ids = sorted(set(node_ids))
        if not ids:
            return {}
        now = await self._store.now(connection)
        query = (
            sa.select(schema.nodes)
            .where(schema.nodes.c.node_id.in_(ids))
            .order_by(schema.nodes.c.node_id)
            .with_for_update(read=True)
        )
        return {row.node_id: node_from_row(row).observed(now) for row in await connection.execute(query)}

    async def _models(self, connection: AsyncConnection, names: Iterable[str]) -> dict[str, Model]:
        """Models by name, locked (FOR UPDATE, in name order) until the transaction ends."""
        ordered = sorted(set(names))
        if not ordered:
            return {}
        query = (
            sa.select(schema.models)
            .where(schema.models.c.name.in_(ordered))
            .order_by(schema.models.c.name)
            .with_for_update()
        )
        return {row.name: model_from_row(row) for row in await connection.execute(query)}

    async def _placements(
        self, connection: AsyncConnection, model_names: Iterable[str], *, lock: bool
    ) -> dict[tuple[str, str], Placement]:
        names = sorted(set(model_names))
        if not names:
            return {}
        table = schema.placements
        query = sa.select(table).where(table.c.model_name.in_(names)).order_by(table.c.model_name, table.c.node_id)
        if lock:
            query = query.with_for_update()
        return {(row.model_name, row.node_id): placement_from_row(row) for row in await connection.execute(query)}

    async def _models_on(self, connection: AsyncConnection, node_ids: Sequence[str]) -> list[str]:
        table = schema.placements
        query = sa.select(table.c.model_name).where(table.c.node_id.in_(list(node_ids))).distinct()
        return sorted((await connection.execute(query)).scalars())

    async def _put_placement(self, connection: AsyncConnection, placement: Placement, *, exists: bool) -> None:
        values = placement_values(placement)
        if exists:
            await connection.execute(_where_key(sa.update(schema.placements), placement).values(**values))
        else:
            await connection.execute(
                sa.insert(schema.placements).values(
                    model_name=placement.model_name, node_id=placement.node_id, **values
                )
            )

    async def _remove(self, write: Write, placements: Iterable[Placement], now: datetime, *, why: str = "") -> None:
        for placement in placements:
            await write.connection.execute(_where_key(sa.delete(schema.placements), placement))
            write.changes.append(PlacementChange(ChangeType.DELETED, placement))
            if why:
                await self._store.insert_event(write.connection, removal_event(placement, why), now)

    async def _derive(
        self,
        write: Write,
        model_names: Iterable[str],
        now: datetime,
        *,
        bases: Mapping[str, Model] | None = None,
        event: ModelEvent | None = None,
    ) -> dict[str, Model]:
        """Derives each model's status from its copies (starting from `bases` where given: the
        model with what a transition just established) and writes and announces the models that
        changed. Returns every model derived."""
        connection = write.connection
        stored = await self._models(connection, model_names)
        placements = await self._placements(connection, stored, lock=False)
        nodes = await self._nodes(connection, {p.node_id for p in placements.values()})
        derived: dict[str, Model] = {}
        for name, current in stored.items():
            base = (bases or {}).get(name, current)
            copies = [p for p in placements.values() if p.model_name == name]
            model = base.model_copy(update={"status": derive_status(base, copies, nodes, now)})
            derived[name] = model
            if model == current:
                continue
            await connection.execute(
                sa.update(schema.models)
                .where(schema.models.c.name == name)
                .values(
                    state=int(model.status.state),
                    status_json=model.status.model_dump_json(),
                    update_time=now,
                )
            )
            write.changes.append(ModelChange(ChangeType.UPDATED, model, event))
        return derived


def _without_lease_times(node: Node) -> Node:
    return node.model_copy(update={"lease_expire_time": None, "lease_renew_time": None})


def _where_key(statement: sa.Update | sa.Delete, placement: Placement) -> sa.Update | sa.Delete:
    table = schema.placements
    return statement.where(table.c.model_name == placement.model_name, table.c.node_id == placement.node_id)
