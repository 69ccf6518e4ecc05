"""The sweep of lost nodes: records a node LOST, and announces it, the moment its lease lapses.

Reads see a lapsed lease as LOST at once (Node.observed); what waits for the record is everything
that acts on the announcement: the placer, which places the node's copies elsewhere, and the
watchers (the inference service's routing). So the sweep does not poll on a timer: it sleeps until
the earliest lease of a live node runs out, and wakes early when a node registers or changes with
a lease that ends before the sweep would wake (a renewal only moves a lease later: on a large fleet
renewals arrive many times a second, and none of them wakes it). `node_sweep_interval_seconds` only
bounds each sleep, for what no announcement tells it: a node registered through another replica
while the change feed (PostgreSQL LISTEN) is down.
Every replica sweeps; each lapse is recorded once (fleet_store.mark_lost_nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import structlog

from modelplane.common.waiting import wait_set
from modelplane.registry.fleet import Node, NodeState
from modelplane.registry.fleet_handlers import FleetHandler
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import NodeChange

log = structlog.get_logger()

# Past the expiry, so that the clock a sleep runs on (monotonic) and the one a lease is written
# in (the database's) agree that it has lapsed; and the least a sleep lasts, so that a lapse
# another replica is recording (skipped here) is not looked at in a busy loop.
_PAST_EXPIRY_SECONDS = 0.01


class NodeSweeper:
    def __init__(self, store: RegistryStore, fleet: FleetHandler, interval_seconds: float) -> None:
        self.store = store
        self.fleet = fleet
        self.interval_seconds = interval_seconds
        self._nodes_changed = asyncio.Event()
        self._wakes_at: datetime | None = None  # when the current sleep ends, None while sweeping

    async def run(self) -> None:
        """Sweeps until cancelled."""
        follower = asyncio.create_task(self._follow_nodes(), name="sweep-follow-nodes")
        try:
            while True:
                self._nodes_changed.clear()  # before reading: a change from here on wakes the sleep
                self._wakes_at = None
                wait = self.interval_seconds
                try:
                    await self.fleet.mark_lost_nodes()
                    wait = self.sleep_seconds(await self.store.fleet.next_lease_expiry())
                except Exception:  # the database is unreachable for now; the next sweep tries again
                    log.exception("cannot sweep for lost nodes")
                self._wakes_at = datetime.now(UTC) + timedelta(seconds=wait)
                await wait_set(self._nodes_changed, wait)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    def sleep_seconds(self, until_expiry: float | None) -> float:
        """How long to sleep before the next sweep: until just past the earliest lease's expiry,
        at most the interval."""
        if until_expiry is None:
            return self.interval_seconds
        return min(self.interval_seconds, max(until_expiry, 0.0) + _PAST_EXPIRY_SECONDS)

    def expires_sooner(self, node: Node) -> bool:
        """Whether `node`'s lease, as a change announced it, ends before the current sleep does
        (always while a sweep is under way: it may have read the node before the change)."""
        if node.state == NodeState.LOST or node.lease_expire_time is None:
            return False
        return self._wakes_at is None or node.lease_expire_time < self._wakes_at

    async def _follow_nodes(self) -> None:
        """Wakes the sweep when a node registers or changes, on this replica or another."""
        while True:
            try:
                with await self.store.subscribe() as subscription:
                    async for change in subscription.changes():
                        if isinstance(change, NodeChange) and self.expires_sooner(change.node):
                            self._nodes_changed.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # the change feed is down (PostgreSQL LISTEN): the interval bounds each sleep
                log.warning("the sweep of lost nodes cannot follow changes; sweeping on its interval", exc_info=True)
            await asyncio.sleep(self.interval_seconds)
