"""The placer loop: one registry replica at a time carries out `placement.plan`'s decisions.

Every replica runs a `Placer`; the one that holds the "placer" lease (leases.py) places, the
others only try to take the lease each round, so a replica that stops renewing is replaced within
one lease duration plus one round. A round reads the fleet from the tables (nodes, models,
placements, request statistics), asks the pure `plan` what to change, and writes the desired side
of the placements through `FleetHandler.set_placements`, fenced by the lease (a deposed placer's
late write is refused). It runs every `placer_interval_seconds`, and promptly (after
`placer_debounce_seconds`) on any change that can alter a decision: a node registered, lost,
drained or reporting new budgets, a model registered, changed or deleted, a copy that became
READY, failed or was evicted. A node lost skips the debounce: its copies serve nobody until they
are placed again. Placements of a LOST node are removed by the plan (their node is not live) and
placed again elsewhere in the same round.

`ensure` is the on-demand path (EnsurePlacement): a request waits for a model with no copy. It
plans for that model alone, marked on demand (so it may displace colder copies), on whichever
replica the request reached: a lease per model ("ensure/<name>") keeps two replicas from placing
the same model twice at once, and the leader's next round sees what it wrote.

The fleet is opt-in by use: until a node has registered, the placer decides nothing, and a model
without placements keeps the single-node, model-level lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import WORKING_STATES, DesiredState, Model, ModelState, Priority, RuntimeTarget
from modelplane.common.waiting import wait_set
from modelplane.loader.footprint import estimate_footprint
from modelplane.loader.preload import forecast
from modelplane.registry.errors import ModelNotFound, NoNodeFits, NotPlacerLeader
from modelplane.registry.fleet import PLACER_LEASE, Node, NodeState, Placement, PlacementTarget, new_holder
from modelplane.registry.fleet_handlers import FleetHandler
from modelplane.registry.placement import (
    EVICTED_REASON,
    DeviceView,
    ModelView,
    NodeView,
    PlacementPlan,
    PlacementPolicy,
    PlacementView,
    Strategy,
    plan,
)
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.statistics import ModelStatistics
from modelplane.registry.store import RegistryStore
from modelplane.registry.watch import ChangeType, ModelChange, NodeChange, PlacementChange

log = structlog.get_logger()

UNPLACED_MODELS = Gauge(
    "modelplane_placer_unplaced_models",
    "Models that want a copy and fit on no node (pending with no copy placed), as of the last round of the "
    "replica that places; 0 on the others. The model tier's autoscaler scales out on it.",
)
PENDING_COPIES = Gauge(
    "modelplane_placer_pending_copies",
    "Copies models want and the placer could not place (a hot model's extra copies included).",
)
IS_LEADER = Gauge(
    "modelplane_placer_is_leader", "1 on the registry replica whose placer holds the placer lease and places; else 0."
)
PLACEMENT_CHANGES = Counter(
    "modelplane_placer_changes_total", "Placements the placer added, asked again, or removed.", ["action"]
)

# Bytes a model with nothing known about its size yet is counted at (the loader's overhead).
_UNKNOWN_FOOTPRINT_BYTES = 32 * 2**20
# A placement whose copy is on its way or serving: the model has a copy, EnsurePlacement returns it.
_GIVEN_UP = frozenset({ModelState.STAGED, ModelState.REGISTERED, ModelState.UNSPECIFIED})
# Which copy to send a waiting request to: the one furthest along towards serving.
_PROGRESS = (
    ModelState.READY,
    ModelState.LOADING,
    ModelState.CONVERTING,
    ModelState.VERIFYING,
    ModelState.FETCHING,
)
_WAIT_FOR_OTHER_REPLICA_SECONDS = 10.0


@dataclass(frozen=True)
class FleetView:
    """What one round reads: the placer's inputs, and the rows they came from."""

    nodes: list[Node]
    models: dict[str, Model]
    placements: list[Placement]
    statistics: dict[str, ModelStatistics]
    now: float


def model_device_kind(model: Model) -> str:
    """The device a model needs on a node: a GPU for the Triton runtimes that run on one (ONNX
    Runtime, TensorRT), host memory for the embedded python backend (the default)."""
    target = model.spec.runtime_hints.target
    return "gpu" if target not in (RuntimeTarget.UNSPECIFIED, RuntimeTarget.EMBEDDED) else "cpu"


def model_footprint(model: Model) -> int:
    """The bytes a copy holds: measured by a node when known, else the operator's or the package's
    estimate (the loader's rule, without a local repository entry)."""
    if model.status.footprint_bytes:
        return model.status.footprint_bytes
    return max(_UNKNOWN_FOOTPRINT_BYTES, estimate_footprint(model, Path("/nonexistent"), _UNKNOWN_FOOTPRINT_BYTES))


def _seconds(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def node_view(node: Node) -> NodeView:
    devices = tuple(DeviceView(d.device, d.capacity_bytes, d.used_bytes) for d in node.devices)
    return NodeView(
        node.node_id,
        devices,
        live=node.state in (NodeState.LIVE, NodeState.DRAINING),
        draining=node.state == NodeState.DRAINING,
        labels=dict(node.labels),
    )


def model_view(model: Model, statistics: ModelStatistics | None, *, on_demand: bool = False) -> ModelView:
    policy = model.spec.placement
    held = model.desired_state == DesiredState.HELD_UNLOADED
    ttl = model.spec.idle_ttl
    return ModelView(
        name=model.name,
        footprint_bytes=model_footprint(model),
        version=model.version,
        task=model.spec.task,
        device_kind=model_device_kind(model),
        priority=model.spec.effective_priority,
        desired_loaded=model.desired_state == DesiredState.LOADED,
        min_copies=policy.min_copies if policy else 0,
        max_copies=policy.max_copies if policy else 0,
        node_selector=dict(policy.node_selector) if policy else {},
        on_demand=on_demand,
        # A pinned model is never unloaded for idleness, as on one node.
        idle_ttl_seconds=0.0 if model.spec.effective_priority == Priority.PINNED else _ttl(ttl),
        # An operator's unload holds: past requests do not keep it (a new request lifts the hold).
        last_request_time=None if held or statistics is None else _seconds(statistics.last_request_time),
    )


def _ttl(ttl: timedelta | None) -> float | None:
    return ttl.total_seconds() if ttl is not None else None


def placement_view(placement: Placement, node: Node | None, *, held: bool) -> PlacementView:
    """The placement as the placer reads it. A state written by an earlier process of the node
    (another incarnation) says nothing about this one: the copy counts as not yet acted on."""
    status = placement.status
    current = node is not None and status.incarnation == node.incarnation
    reason = status.reason
    if status.evicted and not reason.startswith(EVICTED_REASON):
        reason = f"{EVICTED_REASON}: {reason}" if reason else EVICTED_REASON
    return PlacementView(
        placement.model_name,
        placement.node_id,
        version=placement.version,
        generation=placement.generation,
        placed_time=_seconds(placement.create_time) or 0.0,
        observed_generation=status.observed_generation if current else 0,
        state=status.state if current else ModelState.UNSPECIFIED,
        reason=reason if current else "",
        footprint_bytes=status.footprint_bytes if current else 0,
        last_used=None if held else _seconds(status.last_used_time),
        observed_time=_seconds(status.update_time),
    )


class Placer:
    def __init__(
        self,
        store: RegistryStore,
        fleet: FleetHandler,
        settings: RegistrySettings,
        *,
        holder: str = "",
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.settings = settings
        self.holder = holder or new_holder("registry")
        self.policy = PlacementPolicy(
            strategy=Strategy(settings.placer_strategy),
            copy_capacity_rps=settings.placer_copy_capacity_rps,
            min_copy_age_seconds=settings.placer_min_copy_age_seconds,
        )
        self.leader = False
        self.last_plan: PlacementPlan | None = None
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # a node was lost: plan without waiting for more changes
        self._lock = asyncio.Lock()  # one round or on-demand placement at a time in this process
        self._lease = timedelta(seconds=settings.placer_lease_seconds)
        self._pending_said: dict[str, str] = {}
        self._nodes_seen: dict[str, tuple] = {}

    # The loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Places until cancelled; then gives the lease up, so another replica takes over at once."""
        follower = asyncio.create_task(self._follow_changes(), name="placer-changes")
        try:
            while True:
                self._wake.clear()
                self._urgent.clear()
                try:
                    await self.round()
                except NotPlacerLeader:
                    pass  # another replica took over (logged as leadership lost)
                except ModelplaneError as refused:  # the fleet changed between reading and writing
                    log.warning("placer plan refused; planning again", error=refused.message)
                    self._wake.set()
                except Exception:  # the database is unreachable for now: the next round tries again
                    log.exception("placer round failed")
                interval = self.settings.placer_interval_seconds
                await wait_set(self._wake, interval)
                if self._wake.is_set():  # let a burst of changes settle, unless a node is lost: its copies are down
                    await wait_set(self._urgent, self.settings.placer_debounce_seconds)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self._resign()

    def wake(self, *, urgent: bool = False) -> None:
        """Plan again soon: something the placer decides on changed; at once when `urgent`."""
        if self.leader:
            self._wake.set()
            if urgent:
                self._urgent.set()

    async def round(self) -> PlacementPlan | None:
        """One round: take or renew the lease, and if held, plan and write; None when not leader."""
        lease = await self.store.leases.acquire(PLACER_LEASE, self.holder, self._lease)
        self._set_leader(lease is not None)
        if lease is None:
            return None
        async with self._lock:
            view = await self._read()
            if not view.nodes:  # no fleet: one node, model-level lifecycle
                self._publish(PlacementPlan())
                return PlacementPlan()
            result = plan(
                [node_view(n) for n in view.nodes],
                self._model_views(view),
                self._placement_views(view),
                self._rates(view),
                view.now,
                self.policy,
            )
            await self._write(result, leader=True)
            self._publish(result)
            self.last_plan = result
            return result

    async def _follow_changes(self) -> None:
        """Wakes the loop on the changes that can alter a decision, from every replica."""
        while True:
            try:
                with await self.store.subscribe() as subscription:
                    async for change in subscription.changes():
                        if self._matters(change):
                            self.wake(urgent=isinstance(change, NodeChange) and change.node.state == NodeState.LOST)
            except asyncio.CancelledError:
                raise
            except Exception:  # the change feed is down (PostgreSQL LISTEN): rounds still run on the timer
                log.warning("placer cannot follow changes; placing on its timer alone", exc_info=True)
            await asyncio.sleep(self.settings.placer_interval_seconds)

    def _matters(self, change: object) -> bool:
        """Whether a change can alter the placer's decisions now. Progress within a load cannot;
        nor can a renewal that only moves a node's budget figures (the timer's rounds read those),
        which on a large fleet would otherwise keep the leader planning without pause."""
        if isinstance(change, NodeChange):
            node = change.node
            seen = (change.change_type == ChangeType.DELETED, node.state, node.draining, node.incarnation, node.labels)
            if self._nodes_seen.get(node.node_id) == seen:
                return False
            self._nodes_seen[node.node_id] = seen
            return True
        if isinstance(change, PlacementChange):
            return change.placement.status.state not in WORKING_STATES
        if isinstance(change, ModelChange):
            return change.model.state not in WORKING_STATES
        return False

    def _set_leader(self, leader: bool) -> None:
        if leader != self.leader:
            log.info("placer leadership taken" if leader else "placer leadership lost", holder=self.holder)
        self.leader = leader
        IS_LEADER.set(1 if leader else 0)
        if not leader:
            UNPLACED_MODELS.set(0)
            PENDING_COPIES.set(0)

    async def _resign(self) -> None:
        if self.leader:
            with contextlib.suppress(Exception):
                await self.store.leases.release(PLACER_LEASE, self.holder)
        self._set_leader(False)

    # On demand --------------------------------------------------------------------------------

    async def ensure(self, name: str, request_id: str = "") -> tuple[list[Placement], str]:
        """The model's placements and the node a waiting request should go to; places a copy
        when it has none on its way. Raises ModelNotFound, or NoNodeFits with why."""
        async with self._lock:
            deadline = time.monotonic() + _WAIT_FOR_OTHER_REPLICA_SECONDS
            mutex = f"ensure/{name}"
            while True:
                found = await self._copies_of(name)
                if found is not None:
                    return found
                if await self.store.leases.acquire(mutex, self.holder, timedelta(seconds=5)) is not None:
                    break
                if time.monotonic() > deadline:  # the other replica hung while placing: plan anyway
                    break
                await asyncio.sleep(0.1)  # another replica is placing this model now
            try:
                found = await self._copies_of(name)
                return found if found is not None else await self._place_on_demand(name, request_id)
            finally:
                with contextlib.suppress(Exception):
                    await self.store.leases.release(mutex, self.holder)

    async def _copies_of(self, name: str) -> tuple[list[Placement], str] | None:
        """The placements and the chosen node when the model has a copy serving or on its way."""
        model = await self.store.get_model(name)
        if model is None:
            raise ModelNotFound(name)
        placements = await self.fleet.list_placements([name])
        nodes = (
            {n.node_id: n for n in await self.fleet.list_nodes([p.node_id for p in placements])} if placements else {}
        )
        on_way = [p for p in placements if _on_its_way(p, nodes.get(p.node_id))]
        if not on_way:
            return None
        rank = {state: index for index, state in enumerate(_PROGRESS)}
        best = min(on_way, key=lambda p: (rank.get(p.status.state, len(rank)), p.node_id))
        return placements, best.node_id

    async def _place_on_demand(self, name: str, request_id: str) -> tuple[list[Placement], str]:
        view = await self._read()
        model = view.models[name]
        if model.desired_state == DesiredState.HELD_UNLOADED:  # a request lifts an operator's hold, as on one node
            model = await self._lift_hold(name)
            view.models[name] = model
        result = plan(
            [node_view(n) for n in view.nodes],
            self._model_views(view, on_demand=name),
            self._placement_views(view),
            self._rates(view),
            view.now,
            self.policy,
            only={name},
        )
        added = [c for c in result.adds if c.model == name] + [c for c in result.retries if c.model == name]
        if not added:
            pending = next((p for p in result.pending if p.model == name), None)
            why = pending.reason if pending is not None else "the placer found no node for it"
            raise NoNodeFits(
                f"No node can take model '{name}' now: {why}.",
                metadata={"model": name},
                retry_after_seconds=self.settings.placer_interval_seconds
                if pending is not None and pending.room_may_come
                else None,
            )
        await self._write(result, leader=self.leader, request_id=request_id)
        self.wake()  # copies it displaced may need a place
        placements = await self.fleet.list_placements([name])
        return placements, added[0].node

    async def _lift_hold(self, name: str) -> Model:
        def lift(current: Model | None) -> Model:
            if current is None:
                raise ModelNotFound(name)
            if current.desired_state != DesiredState.HELD_UNLOADED:
                return current
            return current.model_copy(update={"desired_state": DesiredState.UNLOADED})

        model, _ = await self.store.transition(name, lift)
        return model

    # Reading and writing ----------------------------------------------------------------------

    async def _read(self) -> FleetView:
        nodes = await self.fleet.list_nodes()
        models: dict[str, Model] = {}
        after = ""
        while True:
            page = await self.store.list_models(after_name=after, limit=1000)
            models.update((m.name, m) for m in page)
            if len(page) < 1000:
                break
            after = page[-1].name
        placements = await self.fleet.list_placements()
        statistics = {s.model_name: s for s in await self.store.statistics()}
        return FleetView(nodes, models, placements, statistics, time.time())

    def _model_views(self, view: FleetView, *, on_demand: str = "") -> list[ModelView]:
        return [
            model_view(m, view.statistics.get(name), on_demand=name == on_demand) for name, m in view.models.items()
        ]

    def _placement_views(self, view: FleetView) -> list[PlacementView]:
        nodes = {n.node_id: n for n in view.nodes}
        held = {name for name, m in view.models.items() if m.desired_state == DesiredState.HELD_UNLOADED}
        return [placement_view(p, nodes.get(p.node_id), held=p.model_name in held) for p in view.placements]

    def _rates(self, view: FleetView) -> dict[str, float]:
        """Expected requests/s per model: the loader's preloading forecast of the registry's
        statistics, over the preloading horizon; none for a model the operator holds unloaded."""
        now = datetime.fromtimestamp(view.now, UTC)
        rates = forecast(view.statistics, now, self.settings.placer_forecast_horizon_seconds)
        for name, model in view.models.items():
            if model.desired_state == DesiredState.HELD_UNLOADED:
                rates.pop(name, None)
        return {name: rate for name, rate in rates.items() if not math.isnan(rate)}

    async def _write(self, result: PlacementPlan, *, leader: bool, request_id: str = "") -> None:
        if result.empty:
            return
        targets = [
            PlacementTarget(model_name=c.model, node_id=c.node, version=c.version, decision=c.reason)
            for c in result.adds
        ] + [
            PlacementTarget(model_name=c.model, node_id=c.node, version=c.version, redo=True, decision=c.reason)
            for c in result.retries
        ]
        removals = [(c.model, c.node) for c in result.removes]
        try:
            await self.fleet.set_placements(
                targets,
                removals,
                leader_holder=self.holder if leader else "",
                reasons={(c.model, c.node): c.reason for c in result.removes},
            )
        except NotPlacerLeader:
            self._set_leader(False)
            raise
        for change in result.changes:
            PLACEMENT_CHANGES.labels(change.action.value).inc()
            log.info(
                "placer decision",
                action=change.action.value,
                model=change.model,
                node=change.node,
                reason=change.reason,
                request_id=request_id or None,
            )

    def _publish(self, result: PlacementPlan) -> None:
        UNPLACED_MODELS.set(sum(1 for p in result.pending if p.placed == 0))
        PENDING_COPIES.set(sum(max(0, p.wanted - p.placed) for p in result.pending))
        pending = {p.model: p for p in result.pending}
        for p in pending.values():  # said once per model and reason, not every round
            if self._pending_said.get(p.model) != p.reason:
                log.warning("placer cannot place", model=p.model, wanted=p.wanted, placed=p.placed, reason=p.reason)
        self._pending_said = {name: p.reason for name, p in pending.items()}


def _on_its_way(placement: Placement, node: Node | None) -> bool:
    """A copy that serves or will: on a live node, written by its current process (or not yet
    acted on), neither failed nor given up."""
    if node is None or node.state not in (NodeState.LIVE, NodeState.DRAINING):
        return False
    status = placement.status
    if status.incarnation != node.incarnation or status.observed_generation < placement.generation:
        return True  # the node has not acted on this generation yet: it will load it
    return status.state != ModelState.FAILED and status.state not in _GIVEN_UP and not status.evicted
