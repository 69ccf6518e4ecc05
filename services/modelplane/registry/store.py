"""Persistence of the catalogue: SQLAlchemy Core over SQLite (WAL) or PostgreSQL.

Every method is one transaction. The store knows rows and JSON; the rules about what may change
and when live in `handlers.py` (models) and `fleet_handlers.py` (nodes, placements). Every write
announces its changes to watchers once it has committed (`changes`): in this process for SQLite,
to every replica for PostgreSQL (watch.py). The fleet's tables are kept by `fleet` (fleet_store.py)
and named leases by `leases` (leases.py), on the same engine and transactions.

Times that several replicas must agree on (leases) come from the database's clock (`now`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from modelplane.common.types import (
    Model,
    ModelAsset,
    ModelEvent,
    ModelState,
    Task,
)
from modelplane.registry import schema
from modelplane.registry.fleet_store import FleetStore
from modelplane.registry.leases import LeaseStore
from modelplane.registry.rows import event_from_row, model_from_row, utc
from modelplane.registry.statistics import RATE_TIME_CONSTANTS, ModelStatistics, StatisticsState
from modelplane.registry.watch import (
    CHANGES_CHANNEL,
    Change,
    ChangeType,
    ModelChange,
    PostgresChangeListener,
    Subscription,
    WatchHub,
    change_from_json,
)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Replicas that start together take this advisory lock to migrate one at a time.
_MIGRATION_LOCK_KEY = 0x6D6F64656C706C61  # "modelpla"
# Announced changes are read back by every replica within milliseconds; older rows are pruned.
_CHANGE_RETENTION = timedelta(minutes=10)
_PRUNE_INTERVAL_SECONDS = 60.0

# Computes a model's new value from its current one (None when it does not exist); may raise.
Mutation = Callable[[Model | None], Model]
# Makes the event that records a change, from the model before and after it.
Describe = Callable[[Model, Model], ModelEvent | None]
# Decides a registration from the model as it is (None when new): the model to store, whether it
# is a new version, its event and the change to announce; or None to leave the model as it is.
Registration = Callable[[Model | None], tuple[Model, bool, ModelEvent | None, ChangeType] | None]
# Called with the ids of the nodes a model is placed on, before a model-level transition; may raise.
PlacedCheck = Callable[[Model, list[str]], None]


def upgrade_schema(connection: sa.Connection, revision: str = "head") -> None:
    """Runs the alembic migrations up to `revision` on an open connection."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _asyncpg_dsn(url: sa.URL) -> str:
    """The SQLAlchemy URL as a DSN that asyncpg itself accepts (for the LISTEN connection)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Write:
    """One write transaction and the changes it will announce when it commits."""

    connection: AsyncConnection
    changes: list[Change] = field(default_factory=list)


def _lock_key(namespace: str, key: str) -> int:
    """A signed 64-bit advisory lock key for one name (PostgreSQL's pg_advisory_xact_lock)."""
    return int.from_bytes(hashlib.sha256(f"{namespace}:{key}".encode()).digest()[:8], "big", signed=True)


class RegistryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        # Committed changes, for WatchModels streams of this process to subscribe to.
        self.changes = WatchHub()
        # SQLite allows one writer; serialising writes here avoids lock-upgrade deadlocks between
        # concurrent transactions of this process, and publishes changes in commit order.
        # PostgreSQL needs no such lock: rows read for a change are locked (FOR UPDATE) instead.
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        self._listener: PostgresChangeListener | None = None
        self._last_prune = 0.0
        self.fleet = FleetStore(self)
        self.leases = LeaseStore(self)

    @classmethod
    async def open(cls, url: str) -> RegistryStore:
        if url.startswith("sqlite"):
            database = sa.engine.make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine.sync_engine, "connect", _configure_sqlite)
        store = cls(engine)
        try:
            await store.migrate()
            if store.postgres:
                store._listener = PostgresChangeListener(_asyncpg_dsn(engine.url), store.changes, store.read_change)
                await store._listener.start()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def migrate(self, revision: str = "head") -> None:
        """Brings the schema to `revision` (the newest by default); runs on every start."""
        async with self.engine.begin() as connection:
            if self.postgres:
                await connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            await connection.run_sync(upgrade_schema, revision)

    async def close(self) -> None:
        self.changes.close()
        if self._listener is not None:
            await self._listener.close()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Write]:
        """One write transaction; the changes appended to it are announced when it commits."""
        lock = self._write_lock or contextlib.nullcontext()
        async with lock:
            async with self.engine.begin() as connection:
                write = Write(connection)
                yield write
                if self.postgres:
                    for change in write.changes:
                        await self._announce(connection, change)
            if not self.postgres:
                for change in write.changes:
                    self.changes.publish(change)

    async def now(self, connection: AsyncConnection) -> datetime:
        """The time by the database's clock on PostgreSQL, so that replicas on machines whose
        clocks differ agree on when a lease expires; this process's clock on SQLite (one replica)."""
        if self.postgres:
            return (await connection.execute(sa.select(sa.func.clock_timestamp()))).scalar_one()
        return datetime.now(UTC)

    async def lock(self, connection: AsyncConnection, namespace: str, key: str) -> None:
        """Serialises transactions over one name until this one ends, even while no row exists for
        it yet (a first registration): PostgreSQL's transaction-level advisory lock. SQLite's
        writes are serialised already."""
        if self.postgres:
            await connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(namespace, key))))

    async def _announce(self, connection: AsyncConnection, change: Change) -> None:
        """Records a change and NOTIFYs its id inside the writing transaction: PostgreSQL delivers
        the notification to every replica when, and only if, the transaction commits."""
        now = datetime.now(UTC)
        result = await connection.execute(
            sa.insert(schema.model_changes).values(payload=change.to_json(), create_time=now)
        )
        change_id = result.inserted_primary_key[0]
        await connection.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, str(change_id))))
        if time.monotonic() - self._last_prune > _PRUNE_INTERVAL_SECONDS:
            self._last_prune = time.monotonic()
            await connection.execute(
                sa.delete(schema.model_changes).where(schema.model_changes.c.create_time < now - _CHANGE_RETENTION)
            )

    async def subscribe(self) -> Subscription:
        """Changes committed after this call, on this replica or (PostgreSQL) any other."""
        if self._listener is not None:
            return await self._listener.subscribe()
        return self.changes.subscribe()

    async def read_change(self, change_id: int) -> Change | None:
        """An announced change, by the id its notification carried; None once pruned."""
        query = sa.select(schema.model_changes.c.payload).where(schema.model_changes.c.id == change_id)
        async with self.engine.connect() as connection:
            payload = (await connection.execute(query)).scalar_one_or_none()
        return change_from_json(payload) if payload is not None else None

    # Models ---------------------------------------------------------------------------------

    async def get_model(self, name: str) -> Model | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(sa.select(schema.models).where(schema.models.c.name == name))).first()
        return model_from_row(row) if row else None

    async def list_models(
        self, *, task: Task = Task.UNSPECIFIED, states: Sequence[ModelState] = (), after_name: str = "", limit: int
    ) -> list[Model]:
        query = sa.select(schema.models).order_by(schema.models.c.name).limit(limit)
        if task:
            query = query.where(schema.models.c.task == int(task))
        if states:
            query = query.where(schema.models.c.state.in_([int(s) for s in states]))
        if after_name:
            query = query.where(schema.models.c.name > after_name)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [model_from_row(row) for row in rows]

    async def register_model(self, name: str, decide: Registration) -> tuple[Model, ModelEvent | None, bool]:
        """Reads a model and applies `decide` to it, and writes what it decides (the model, its
        version row, its event) in one transaction, serialised per name across every replica, so
        two registrations never both take the same version number. Returns the model as stored,
        its event, and whether anything was written."""
        async with self.write() as write:
            connection = write.connection
            await self.lock(connection, "model", name)
            row = (
                await connection.execute(sa.select(schema.models).where(schema.models.c.name == name).with_for_update())
            ).first()
            current = model_from_row(row) if row else None
            decision = decide(current)
            if decision is None:
                assert current is not None
                return current, None, False
            model, new_version, event, change = decision
            now = datetime.now(UTC)
            values = {
                "version": model.version,
                "task": int(model.spec.task),
                "state": int(model.status.state),
                "desired_state": int(model.desired_state),
                "spec_json": model.spec.model_dump_json(),
                "status_json": model.status.model_dump_json(),
                "update_time": now,
            }
            if current is not None:
                model = model.model_copy(update={"create_time": current.create_time})
                await connection.execute(sa.update(schema.models).where(schema.models.c.name == name).values(**values))
            else:
                model = model.model_copy(update={"create_time": now})
                await connection.execute(sa.insert(schema.models).values(name=name, create_time=now, **values))
            if new_version:
                await connection.execute(
                    sa.insert(schema.model_versions).values(
                        model_name=name, version=model.version, spec_json=values["spec_json"], create_time=now
                    )
                )
            if event is not None:
                event = await self.insert_event(connection, event, now)
            write.changes.append(ModelChange(change, model, event))
        return model, event, True

    async def transition(
        self,
        name: str,
        mutate: Mutation,
        *,
        describe: Describe | None = None,
        assets: Sequence[ModelAsset] | None = None,
        placed_check: PlacedCheck | None = None,
    ) -> tuple[Model, ModelEvent | None]:
        """Reads a model, applies `mutate` (which may raise to refuse), and writes the result, the
        event `describe` makes of the change, and the assets, in one transaction, so two writers
        cannot interleave. Watchers are told of the result as an update. `placed_check`, when
        given, sees the nodes the model is placed on first, and may refuse."""
        async with self.write() as write:
            connection = write.connection
            row = (
                await connection.execute(sa.select(schema.models).where(schema.models.c.name == name).with_for_update())
            ).first()
            current = model_from_row(row) if row else None
            if placed_check is not None and current is not None:
                placed_check(current, await self.fleet.nodes_holding(connection, name))
            updated = mutate(current)
            now = datetime.now(UTC)
            await connection.execute(
                sa.update(schema.models)
                .where(schema.models.c.name == name)
                .values(
                    state=int(updated.status.state),
                    desired_state=int(updated.desired_state),
                    spec_json=updated.spec.model_dump_json(),
                    status_json=updated.status.model_dump_json(),
                    update_time=now,
                )
            )
            if assets is not None:
                await self.replace_assets(connection, name, assets)
            event = describe(current, updated) if describe and current else None
            if event is not None:
                event = await self.insert_event(connection, event, now)
            write.changes.append(ModelChange(ChangeType.UPDATED, updated, event))
        return updated, event

    async def delete_model(self, name: str) -> None:
        async with self.write() as write:
            connection = write.connection
            row = (
                await connection.execute(sa.select(schema.models).where(schema.models.c.name == name).with_for_update())
            ).first()
            if row is None:
                return
            for table in (
                schema.models,
                schema.model_versions,
                schema.model_events,
                schema.model_assets,
                schema.model_request_stats,
            ):
                column = table.c.name if table is schema.models else table.c.model_name
                await connection.execute(sa.delete(table).where(column == name))
            await self._drop_orphan_assets(connection)
            await self.fleet.remove_placements_of_model(write, name)
            write.changes.append(ModelChange(ChangeType.DELETED, model_from_row(row)))

    # Events -------------------------------------------------------------------------------

    async def insert_event(self, connection: AsyncConnection, event: ModelEvent, now: datetime) -> ModelEvent:
        result = await connection.execute(
            sa.insert(schema.model_events).values(
                model_name=event.model_name,
                version=event.version,
                from_state=int(event.from_state),
                to_state=int(event.to_state),
                message=event.message,
                request_id=event.request_id,
                create_time=now,
                node_id=event.node_id,
            )
        )
        return event.model_copy(update={"id": result.inserted_primary_key[0], "create_time": now})

    async def list_events(self, *, name: str = "", after_id: int = 0, limit: int) -> list[ModelEvent]:
        query = sa.select(schema.model_events).where(schema.model_events.c.id > after_id)
        if name:
            query = query.where(schema.model_events.c.model_name == name)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query.order_by(schema.model_events.c.id).limit(limit))).all()
        return [event_from_row(row) for row in rows]

    # Assets -------------------------------------------------------------------------------

    async def replace_assets(self, connection: AsyncConnection, name: str, assets: Sequence[ModelAsset]) -> None:
        await self.lock(connection, "assets", "")  # see _drop_orphan_assets
        await connection.execute(sa.delete(schema.model_assets).where(schema.model_assets.c.model_name == name))
        insert = postgresql.insert if self.postgres else sqlite.insert
        for asset in assets:
            # Many models share a file (a tokenizer): another replica's transaction may be recording
            # it now, unseen until it commits. ON CONFLICT waits for that one and keeps its row.
            await connection.execute(
                insert(schema.assets).values(sha256=asset.sha256, content=asset.content).on_conflict_do_nothing()
            )
            await connection.execute(
                sa.insert(schema.model_assets).values(model_name=name, name=asset.name, sha256=asset.sha256)
            )
        await self._drop_orphan_assets(connection)

    async def _drop_orphan_assets(self, connection: AsyncConnection) -> None:
        """Drops the files no model refers to any more. A transaction recording a reference to a
        file holds the assets lock until it commits: the sweep waits for it rather than dropping a
        file whose new reference it cannot see yet (the last model holding a shared tokenizer
        deleted while a load on another replica records it for a second model)."""
        await self.lock(connection, "assets", "")
        referenced = sa.select(schema.model_assets.c.sha256)
        await connection.execute(sa.delete(schema.assets).where(schema.assets.c.sha256.not_in(referenced)))

    async def get_assets(self, name: str) -> list[ModelAsset]:
        query = (
            sa.select(schema.model_assets.c.name, schema.assets.c.sha256, schema.assets.c.content)
            .join(schema.assets, schema.assets.c.sha256 == schema.model_assets.c.sha256)
            .where(schema.model_assets.c.model_name == name)
            .order_by(schema.model_assets.c.name)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [ModelAsset(name=row.name, sha256=row.sha256, content=row.content) for row in rows]

    # Request statistics -------------------------------------------------------------------

    async def record_requests(self, name: str, count: int, cold_starts: int, last_request: datetime) -> None:
        table = schema.model_request_stats
        async with self.write() as write:
            connection = write.connection
            row = (
                await connection.execute(sa.select(table).where(table.c.model_name == name).with_for_update())
            ).first()
            state = _statistics_from_row(row) if row else StatisticsState()
            state = state.record(count, cold_starts, last_request, time.time())
            values = {
                "total_requests": state.total_requests,
                "cold_starts": state.cold_starts,
                "rates_time": state.rates_time,
                "hour_of_day_json": json.dumps(list(state.hour_of_day_counts)),
                "last_request_time": state.last_request_time,
                **state.rates,
            }
            if row is None:
                await connection.execute(sa.insert(table).values(model_name=name, **values))
            else:
                await connection.execute(sa.update(table).where(table.c.model_name == name).values(**values))

    async def statistics(self, names: Sequence[str] = ()) -> list[ModelStatistics]:
        table = schema.model_request_stats
        query = sa.select(table).order_by(table.c.model_name)
        if names:
            query = query.where(table.c.model_name.in_(list(names)))
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        now = time.time()
        return [_statistics_from_row(row).snapshot(row.model_name, now) for row in rows]


def _statistics_from_row(row: sa.Row) -> StatisticsState:
    return StatisticsState(
        total_requests=row.total_requests,
        cold_starts=row.cold_starts,
        rates={name: getattr(row, name) for name in RATE_TIME_CONSTANTS},
        rates_time=row.rates_time,
        hour_of_day_counts=tuple(json.loads(row.hour_of_day_json)),
        last_request_time=utc(row.last_request_time),
    )


def _configure_sqlite(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL lets readers run beside the writer; synchronous=FULL makes every acknowledged write
    # survive a crash of the process or the machine.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
