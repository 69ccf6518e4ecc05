"""The fleet's rules: who may register a node, renew its lease, place a model, report a copy.

Used by the gRPC servicer; works on domain types only, so it is tested without a network. The
store applies each rule inside the transaction that writes its result (fleet_store.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from modelplane.common.types import (
    LoadProgress,
    Model,
    ModelAsset,
    ModelEvent,
    ModelState,
    PackageManifest,
    ServingProfile,
)
from modelplane.registry.errors import (
    InvalidNode,
    InvalidPlacement,
    ModelNotFound,
    NodeIdInUse,
    NodeLeaseLost,
    NodeNotFound,
    NodeUnavailable,
    PlacementNotFound,
    StaleTransition,
)
from modelplane.registry.fleet import (
    DEFAULT_LEASE,
    MAX_LEASE,
    MIN_LEASE,
    Node,
    NodeDevice,
    NodeState,
    Placement,
    PlacementScope,
    PlacementStatus,
    PlacementTarget,
    PlacementWrites,
    device_problems,
    missing_labels,
    node_problems,
    removal_event,
)
from modelplane.registry.lifecycle import advance, check_step, with_package_facts
from modelplane.registry.store import RegistryStore

log = structlog.get_logger()


@dataclass(frozen=True)
class PlacementTransition:
    """What a node's loader asks the registry to record of one copy."""

    model_name: str
    node_id: str
    incarnation: int
    version: int
    to_state: ModelState
    expected_from_state: ModelState = ModelState.UNSPECIFIED
    message: str = ""
    progress: LoadProgress | None = None
    footprint_bytes: int = 0
    observed_generation: int = 0
    evicted: bool = False
    last_used_time: datetime | None = None
    manifest: PackageManifest | None = None
    profile: ServingProfile | None = None
    assets: Sequence[ModelAsset] | None = None
    request_id: str = ""
    progress_only: bool = False
    begins_operation: bool = False


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = (moment - now).total_seconds()
    relative = f"in {seconds:.1f} s" if seconds >= 0 else f"{-seconds:.1f} s ago"
    return f"{moment.isoformat(timespec='seconds')} ({relative})"


def _held_by(node: Node, now: datetime) -> str:
    return (
        f"held by {node.holder} (incarnation {node.incarnation}, loader {node.loader_address}, "
        f"Triton {node.triton_address}); its lease expires {_when(node.lease_expire_time, now)}"
    )


def _check_holder(node: Node | None, node_id: str, incarnation: int, now: datetime) -> Node:
    """The node, when the caller's incarnation holds its lease now; else why it must stop."""
    if node is None:
        raise NodeNotFound(node_id)
    metadata = {"node": node_id, "incarnation": str(node.incarnation)}
    if node.incarnation != incarnation:
        raise NodeLeaseLost(
            f"Node '{node_id}' was registered again by another process ({_held_by(node, now)}); this process "
            f"(incarnation {incarnation}) no longer holds it: stop serving its copies and register again.",
            metadata=metadata,
        )
    if not node.lease_valid(now):
        raise NodeLeaseLost(
            f"The lease of node '{node_id}' (incarnation {incarnation}) expired "
            f"{_when(node.lease_expire_time, now)}; the node is LOST. Stop serving its copies and register again.",
            metadata=metadata,
        )
    return node


class FleetHandler:
    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    # Nodes --------------------------------------------------------------------------------------

    async def register_node(self, node: Node, lease_duration: timedelta | None = None) -> Node:
        duration = lease_duration or DEFAULT_LEASE
        problems = node_problems(node)
        if not MIN_LEASE <= duration <= MAX_LEASE:
            problems.append(f"lease_duration {duration.total_seconds():g} s is outside 1 s to 10 min")
        if problems:
            raise InvalidNode(f"Node '{node.node_id}' cannot register: {'; '.join(problems)}.")

        def decide(current: Node | None, now: datetime) -> Node:
            alive = current is not None and current.lease_valid(now)
            if current is not None and alive and current.holder != node.holder:
                remaining = (current.lease_expire_time - now).total_seconds()  # type: ignore[operator]
                raise NodeIdInUse(
                    f"Node id '{node.node_id}' is in use: {_held_by(current, now)}. Another process runs as "
                    f"'{node.node_id}': stop it, or give this process another node id. A process replacing a "
                    "crashed one can register once that lease has expired.",
                    metadata={
                        "node": node.node_id,
                        "holder": current.holder,
                        "lease_expire_time": current.lease_expire_time.isoformat(),  # type: ignore[union-attr]
                    },
                    retry_after_seconds=max(remaining, 0.0),
                )
            same = current is not None and alive  # the same holder, registering again
            incarnation = current.incarnation if same else (current.incarnation + 1 if current else 1)
            return node.model_copy(
                update={
                    "incarnation": incarnation,
                    "lease_duration": duration,
                    "lease_expire_time": now + duration,
                    "lease_renew_time": now,
                    # A drain lasts for the process it was meant for: a new one starts undrained.
                    "draining": current.draining if same else False,
                    "register_time": current.register_time if same else now,
                    "create_time": current.create_time if current else now,
                }
            )

        registered = await self.store.fleet.write_node(node.node_id, decide)
        log.info(
            "node registered",
            node=registered.node_id,
            incarnation=registered.incarnation,
            holder=registered.holder,
            lease_seconds=duration.total_seconds(),
        )
        return registered

    async def renew_node_lease(self, node_id: str, incarnation: int, devices: Sequence[NodeDevice] = ()) -> Node:
        problems = device_problems(devices)
        if problems:
            raise InvalidNode(f"Node '{node_id}' reported bad devices: {'; '.join(problems)}.")

        def decide(current: Node | None, now: datetime) -> Node:
            node = _check_holder(current, node_id, incarnation, now)
            duration = node.lease_duration or DEFAULT_LEASE
            return node.model_copy(
                update={
                    "devices": list(devices) or node.devices,
                    "lease_expire_time": now + duration,
                    "lease_renew_time": now,
                }
            )

        return await self.store.fleet.write_node(node_id, decide)

    async def drain_node(self, node_id: str, *, cancel: bool = False) -> Node:
        def decide(current: Node | None, _now: datetime) -> Node:
            if current is None:
                raise NodeNotFound(node_id)
            return current.model_copy(update={"draining": not cancel})

        node = await self.store.fleet.write_node(node_id, decide)
        log.info("node drain cancelled" if cancel else "node draining", node=node_id)
        return node

    async def delete_node(self, node_id: str) -> None:
        def check(node: Node | None, now: datetime) -> None:
            if node is None:
                raise NodeNotFound(node_id)
            if node.lease_valid(now):
                raise NodeUnavailable(
                    f"Node '{node_id}' is {node.state.name}: {_held_by(node, now)}. Stop its loader (drain it "
                    "first to move its copies) and delete it once it is LOST.",
                    metadata={"node": node_id, "state": node.state.name},
                )

        await self.store.fleet.delete_node(node_id, check)
        log.info("node deleted", node=node_id)

    async def list_nodes(self, node_ids: Collection[str] = (), states: Collection[NodeState] = ()) -> list[Node]:
        return await self.store.fleet.list_nodes(node_ids, states)

    async def mark_lost_nodes(self) -> list[Node]:
        lost = await self.store.fleet.mark_lost_nodes()
        for node in lost:
            log.warning(
                "node lost: its lease expired",
                node=node.node_id,
                incarnation=node.incarnation,
                holder=node.holder,
                lease_expire_time=node.lease_expire_time.isoformat() if node.lease_expire_time else "",
            )
        return lost

    # Placements -------------------------------------------------------------------------------

    async def list_placements(
        self, model_names: Collection[str] = (), node_ids: Collection[str] = ()
    ) -> list[Placement]:
        return await self.store.fleet.list_placements(model_names, node_ids)

    async def set_placements(
        self,
        targets: Sequence[PlacementTarget],
        removals: Sequence[tuple[str, str]] = (),
        *,
        leader_holder: str = "",
        reasons: Mapping[tuple[str, str], str] | None = None,
    ) -> tuple[list[Placement], list[Placement]]:
        """Writes placements and removes others in one transaction; `reasons` says why each
        removal (model, node) is made, in the model's events."""
        why = reasons or {}
        keys = [(t.model_name, t.node_id) for t in targets]
        twice = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & set(removals)))
        if twice:
            raise InvalidPlacement(
                "Each placement may appear once in a batch; these appear more than once: "
                + ", ".join(f"{m} on {n}" for m, n in twice)
                + "."
            )

        def decide(scope: PlacementScope) -> PlacementWrites:
            writes = PlacementWrites()
            for key in removals:
                removed = scope.placements.get(key)
                if removed is not None:
                    writes.removals.append(removed)
                    writes.events.append(removal_event(removed, why.get(key) or "the placer removed it"))
            for target in targets:
                placement, event = _place(target, scope)
                if placement is not None:
                    writes.upserts.append(placement)
                if event is not None:
                    writes.events.append(event)
            return writes

        node_ids = {t.node_id for t in targets}
        model_names = {t.model_name for t in targets} | {name for name, _ in removals}
        writes = await self.store.fleet.set_placements(node_ids, model_names, decide, leader=leader_holder)
        for event in writes.events:
            log.info("placement", model=event.model_name, node=event.node_id, message=event.message)
        by_key = {p.key: p for p in writes.upserts}
        current = await self.store.fleet.list_placements(model_names, node_ids) if targets else []
        unchanged = {p.key: p for p in current if p.key in set(keys) and p.key not in by_key}
        return [by_key.get(k) or unchanged[k] for k in keys], writes.removals

    async def transition_placement(self, request: PlacementTransition) -> tuple[Placement, Model, ModelEvent | None]:
        if request.to_state == ModelState.UNSPECIFIED:
            raise InvalidPlacement("to_state is required.")
        subject = f"Copy of model '{request.model_name}' on node '{request.node_id}'"

        def decide(
            model: Model | None, node: Node | None, placement: Placement | None, now: datetime
        ) -> tuple[Placement, Model, ModelEvent | None]:
            if model is None:
                raise ModelNotFound(request.model_name)
            _check_holder(node, request.node_id, request.incarnation, now)
            if placement is None:
                raise PlacementNotFound(
                    f"Model '{request.model_name}' is not placed on node '{request.node_id}' (the placer removed "
                    "the placement, or never made it): unload the copy from this node.",
                    metadata={"model": request.model_name, "node": request.node_id},
                )
            metadata = {"model": request.model_name, "node": request.node_id, "state": placement.status.state.name}
            if request.version != placement.version:
                raise StaleTransition(
                    f"{subject} is wanted at version {placement.version}; the transition for version "
                    f"{request.version} is stale.",
                    metadata={**metadata, "wanted_version": str(placement.version)},
                )
            if request.observed_generation > placement.generation:
                raise InvalidPlacement(
                    f"{subject} is at generation {placement.generation}; observed_generation "
                    f"{request.observed_generation} is ahead of it.",
                    metadata=metadata,
                )
            check_step(
                subject,
                placement.status.state,
                request.to_state,
                expected_from_state=request.expected_from_state,
                progress_only=request.progress_only,
                metadata=metadata,
            )
            return _transitioned(request, model, placement, now)

        placement, model, event = await self.store.fleet.transition_placement(
            request.model_name, request.node_id, decide, assets=request.assets
        )
        if event is not None:
            log.info(
                "placement transition",
                model=request.model_name,
                node=request.node_id,
                version=request.version,
                from_state=event.from_state.name,
                to_state=event.to_state.name,
                message=event.message,
            )
        return placement, model, event


def _place(target: PlacementTarget, scope: PlacementScope) -> tuple[Placement | None, ModelEvent | None]:
    """The placement a target asks for, and its event; (None, None) when it changes nothing."""
    model = scope.models.get(target.model_name)
    if model is None:
        raise ModelNotFound(target.model_name)
    node = scope.nodes.get(target.node_id)
    if node is None:
        raise NodeNotFound(target.node_id)
    current = scope.placements.get((target.model_name, target.node_id))
    where = f"model '{target.model_name}' on node '{target.node_id}'"
    if node.state == NodeState.LOST:
        raise NodeUnavailable(
            f"Cannot place {where}: the node is LOST (its lease expired {_when(node.lease_expire_time, scope.now)}). "
            "Place it on a live node.",
            metadata={"node": node.node_id, "state": node.state.name},
        )
    if node.state == NodeState.DRAINING and current is None:
        raise NodeUnavailable(
            f"Cannot place {where}: the node is draining. Place it on another node, or cancel the drain "
            f"(`modelplane nodes drain {node.node_id} --cancel`).",
            metadata={"node": node.node_id, "state": node.state.name},
        )
    version = target.version or model.version
    if not 1 <= version <= model.version:
        raise InvalidPlacement(
            f"Cannot place {where} at version {version}: the model has versions 1 to {model.version}.",
            metadata={"model": model.name, "current_version": str(model.version)},
        )
    selector = model.spec.placement.node_selector if model.spec.placement else {}
    missing = missing_labels(selector, node.labels)
    if missing:
        carried = ", ".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "no labels"
        raise InvalidPlacement(
            f"Cannot place {where}: the node lacks the labels the model's node_selector requires "
            f"({', '.join(f'{k}={v}' for k, v in sorted(missing.items()))}); it carries {carried}.",
            metadata={"model": model.name, "node": node.node_id},
        )
    now = scope.now
    if current is None:
        placement = Placement(
            model_name=model.name,
            node_id=node.node_id,
            version=version,
            generation=1,
            decision=target.decision,
            create_time=now,
            update_time=now,
        )
        message = f"placed on node {node.node_id} (version {version}, generation 1)"
        return placement, _placement_event(placement, ModelState.UNSPECIFIED, message, target.decision)
    again = target.redo or version != current.version
    if not again and target.decision == current.decision:
        return None, None
    generation = current.generation + 1 if again else current.generation
    placement = current.model_copy(
        update={"version": version, "generation": generation, "decision": target.decision, "update_time": now}
    )
    if not again:
        return placement, None
    message = f"asked node {node.node_id} again (version {version}, generation {generation})"
    return placement, _placement_event(placement, current.status.state, message, target.decision)


def _placement_event(placement: Placement, from_state: ModelState, message: str, decision: str) -> ModelEvent:
    return ModelEvent(
        model_name=placement.model_name,
        version=placement.version,
        from_state=from_state,
        to_state=placement.status.state,
        message=f"{message}: {decision}" if decision else message,
        node_id=placement.node_id,
    )


def _transitioned(
    request: PlacementTransition, model: Model, placement: Placement, now: datetime
) -> tuple[Placement, Model, ModelEvent | None]:
    status: PlacementStatus = advance(
        placement.status,
        request.to_state,
        message=request.message,
        progress=request.progress,
        progress_only=request.progress_only,
        begins_operation=request.begins_operation,
        now=now,
    )
    updates: dict[str, object] = {"version": request.version, "incarnation": request.incarnation}
    if not request.progress_only:
        updates["evicted"] = request.evicted
    if request.footprint_bytes:
        updates["footprint_bytes"] = request.footprint_bytes
    if request.observed_generation:
        updates["observed_generation"] = request.observed_generation
    if request.last_used_time is not None:
        updates["last_used_time"] = request.last_used_time
    updated = placement.model_copy(update={"status": status.model_copy(update=updates)})
    if request.version == model.version and not request.progress_only:
        facts = with_package_facts(model.status, request.manifest, request.profile, request.footprint_bytes)
        model = model.model_copy(update={"status": facts})
    event = None
    if not request.progress_only:
        event = ModelEvent(
            model_name=request.model_name,
            version=request.version,
            from_state=placement.status.state,
            to_state=request.to_state,
            message=request.message,
            request_id=request.request_id,
            node_id=request.node_id,
        )
    return updated, model, event
