"""Fan-out of catalogue and fleet changes (models, nodes, placements) to WatchModels streams.

Within one registry process a `WatchHub` hands each committed change to every watcher. With
several replicas on one PostgreSQL database, a change written through any replica must reach the
watchers of all of them: the writer records it in the `model_changes` table and sends its id with
NOTIFY in the same transaction (so a change is announced exactly when it commits, in commit
order), and each replica's `PostgresChangeListener` reads it and hands it to its own hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog

from modelplane.common.types import Model, ModelEvent
from modelplane.registry.errors import WatchUnavailable
from modelplane.registry.fleet import Node, Placement

log = structlog.get_logger()


class ChangeType(enum.IntEnum):
    UNSPECIFIED = 0
    INITIAL = 1
    REGISTERED = 2
    UPDATED = 3
    DELETED = 4


@dataclass(frozen=True)
class ModelChange:
    change_type: ChangeType
    model: Model
    event: ModelEvent | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": "model",
                "change_type": int(self.change_type),
                "model": self.model.model_dump(mode="json"),
                "event": self.event.model_dump(mode="json") if self.event else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelChange:
        change = change_from_json(text)
        if not isinstance(change, ModelChange):
            raise ValueError(f"not a model change: {text[:80]}")
        return change


@dataclass(frozen=True)
class NodeChange:
    """A node was registered by a new process, drained or undrained, changed its budgets, or was
    lost or deleted; `node` is the node after the change (before it, for a deletion)."""

    change_type: ChangeType
    node: Node

    def to_json(self) -> str:
        return json.dumps(
            {"kind": "node", "change_type": int(self.change_type), "node": self.node.model_dump(mode="json")}
        )


@dataclass(frozen=True)
class PlacementChange:
    """Either side of a placement changed, or it was made or removed."""

    change_type: ChangeType
    placement: Placement

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": "placement",
                "change_type": int(self.change_type),
                "placement": self.placement.model_dump(mode="json"),
            }
        )


# What the hub carries and WatchModels streams: a change to a model, a node or a placement.
Change = ModelChange | NodeChange | PlacementChange


def change_from_json(text: str) -> Change:
    """A change as `to_json` wrote it. Rows without a kind (written by a replica of the release
    before the fleet) are model changes."""
    data = json.loads(text)
    change_type = ChangeType(data["change_type"])
    kind = data.get("kind", "model")
    if kind == "node":
        return NodeChange(change_type, Node.model_validate(data["node"]))
    if kind == "placement":
        return PlacementChange(change_type, Placement.model_validate(data["placement"]))
    event = data["event"]
    return ModelChange(
        change_type=change_type,
        model=Model.model_validate(data["model"]),
        event=ModelEvent.model_validate(event) if event else None,
    )


class Subscription:
    """Changes published after the subscription was made, in order; ends when the hub closes it."""

    def __init__(self, hub: WatchHub, queue_size: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(queue_size)

    def offer(self, change: Change | None) -> bool:
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            return False
        return True

    def end(self) -> None:
        """Ends the stream even when its queue is full: the end marker replaces the oldest change."""
        if not self.offer(None):
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def changes(self) -> AsyncIterator[Change]:
        while (change := await self._queue.get()) is not None:
            yield change

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub.unsubscribe(self)


class WatchHub:
    """Each watcher gets a bounded queue. A watcher too slow to keep up is disconnected rather
    than allowed to hold memory without bound; it reconnects with include_initial and resyncs."""

    def __init__(self, queue_size: int = 1024) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, change: Change) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.offer(change):
                log.warning("watcher too slow; disconnecting it")
                self.unsubscribe(subscription)
                subscription.end()

    def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.end()
        self._subscriptions.clear()


# The NOTIFY channel that carries the ids of committed `model_changes` rows between replicas.
CHANGES_CHANNEL = "modelplane_model_changes"
# A notification that marks where a new watcher joins the stream, rather than a change.
_BARRIER = "join:"


class PostgresChangeListener:
    """LISTENs on a connection of its own and publishes every committed change into `hub`.

    Notifications arrive in commit order and are read back and published one at a time, so
    watchers see changes in the order they were committed on any replica. A new watcher joins at
    a barrier (`subscribe`), so it sees exactly the changes committed after it joined, as with
    the hub of one process; a snapshot read after joining then misses nothing. If the connection
    drops, notifications sent meanwhile are lost: every watcher is ended (it reconnects with
    include_initial and resyncs, as a watcher too slow to keep up does) and the listener
    reconnects with backoff.
    """

    def __init__(
        self,
        dsn: str,
        hub: WatchHub,
        read_change: Callable[[int], Awaitable[Change | None]],
        *,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._hub = hub
        self._read_change = read_change
        self._max_backoff = max_backoff_seconds
        self._notifications: asyncio.Queue[str] = asyncio.Queue()
        self._barriers: dict[str, asyncio.Future[Subscription]] = {}
        self._notify_lock = asyncio.Lock()
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Returns once LISTEN is in effect, so every change committed afterwards is delivered."""
        await self._listen()
        self._tasks = [
            asyncio.create_task(self._deliver(), name="registry-change-delivery"),
            asyncio.create_task(self._keep_listening(), name="registry-change-listener"),
        ]

    async def _listen(self) -> None:
        connection = await asyncpg.connect(self._dsn)
        connection.add_termination_listener(lambda _connection: self._lost.set())
        await connection.add_listener(CHANGES_CHANNEL, self._on_notification)
        self._connection = connection
        self._lost.clear()

    def _on_notification(self, _connection: asyncpg.Connection, _pid: int, _channel: str, payload: str) -> None:
        self._notifications.put_nowait(payload)

    async def subscribe(self, timeout_seconds: float = 10.0) -> Subscription:
        """A subscription that starts after every change committed before this call."""
        token = uuid.uuid4().hex
        joined: asyncio.Future[Subscription] = asyncio.get_running_loop().create_future()
        self._barriers[token] = joined
        try:
            async with asyncio.timeout(timeout_seconds):
                async with self._notify_lock:
                    if self._connection is None or self._connection.is_closed():
                        raise ConnectionError("not listening")
                    await self._connection.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, _BARRIER + token)
                return await joined
        except (TimeoutError, ConnectionError, asyncpg.PostgresError, OSError) as error:
            raise WatchUnavailable(
                "The registry cannot follow changes right now (its PostgreSQL LISTEN connection is down); "
                "retry the watch shortly."
            ) from error
        finally:
            self._barriers.pop(token, None)

    async def _deliver(self) -> None:
        while True:
            payload = await self._notifications.get()
            if payload.startswith(_BARRIER):
                joined = self._barriers.get(payload.removeprefix(_BARRIER))
                if joined is not None and not joined.done():
                    joined.set_result(self._hub.subscribe())
                continue
            change_id = int(payload)
            try:
                change = await self._read_change(change_id)
            except Exception:  # the database is unreachable; watchers must resync
                log.exception("cannot read a committed change; ending watchers so they resync", change_id=change_id)
                self._hub.close()
                continue
            if change is None:
                log.warning("a committed change was pruned before it was read; ending watchers", change_id=change_id)
                self._hub.close()
                continue
            self._hub.publish(change)

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("registry lost its LISTEN connection to PostgreSQL; ending watchers so they resync")
            self._hub.close()
            backoff = 0.5
            while True:
                try:
                    await self._listen()
                    log.info("registry listening for changes again")
                    break
                except Exception as error:  # noqa: BLE001 - any failure is retried
                    log.warning("cannot LISTEN on PostgreSQL yet", error=str(error), retry_in_seconds=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        connection = self._connection
        self._connection = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close(timeout=5)
