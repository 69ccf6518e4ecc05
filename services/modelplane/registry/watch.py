"""Fan-out of catalogue changes to WatchModels streams within one registry process."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from modelplane.common.types import Model, ModelEvent

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


class Subscription:
    """Changes published after the subscription was made, in order; ends when the hub closes it."""

    def __init__(self, hub: WatchHub, queue_size: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[ModelChange | None] = asyncio.Queue(queue_size)

    def offer(self, change: ModelChange | None) -> bool:
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

    async def changes(self) -> AsyncIterator[ModelChange]:
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

    def publish(self, change: ModelChange) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.offer(change):
                log.warning("watcher too slow; disconnecting it")
                self.unsubscribe(subscription)
                subscription.end()

    def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.end()
        self._subscriptions.clear()
