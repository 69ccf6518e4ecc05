"""Where one node records the state of the models it holds: the one narrow interface every state
write of the loader goes through.

`NodeResidency` writes nothing but through a `StateWriter`. Today that is `RegistryStates`: one
node holds every model, so the registry's model transition records it all. With placements
(issue 17), a writer that records this node's placement transition (node id and incarnation
checked) takes its place, and nothing else changes. `ShadowStates` records a refresh beside a
served copy, where nothing may reach the registry until the switch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Protocol

from modelplane.common.errors import NotFound
from modelplane.common.types import (
    WORKING_STATES,
    DesiredState,
    LoadProgress,
    Model,
    ModelAsset,
    ModelState,
    PackageManifest,
    PhaseDuration,
    ServingProfile,
)
from modelplane.registry.client import RegistryClient
from modelplane.registry.errors import PlacementNotFound
from modelplane.registry.fleet import Placement
from modelplane.registry.lifecycle import path_before


class ModelReader(Protocol):
    """Where the residency reads a model as this node sees it: the registry client on a single
    node, `PlacementStates` on a node of a fleet."""

    async def get_model(self, name: str) -> Model: ...


class Transitions(Protocol):
    """Where a load's transitions are recorded (the pipeline's ModelTracker writes through it):
    a StateWriter, or anything with the registry client's `transition`."""

    async def transition(
        self,
        model: Model,
        to_state: ModelState,
        message: str = "",
        *,
        expected_from_state: ModelState = ModelState.UNSPECIFIED,
        progress: LoadProgress | None = None,
        manifest: PackageManifest | None = None,
        profile: ServingProfile | None = None,
        assets: Sequence[ModelAsset] | None = None,
        footprint_bytes: int = 0,
        progress_only: bool = False,
        begins_operation: bool = False,
        request_id: str = "",
    ) -> Model: ...


class StateWriter(Transitions, Protocol):
    """Every write the residency makes. `transition` (from `Transitions`) records the state of
    this node's copy of a model; `wish` relays what an operator or a request asked for;
    `release` records that this node let a model go on its own account."""

    async def wish(self, name: str, desired: DesiredState) -> Model:
        """Records the desired state an operator or a request asked for."""
        ...

    async def release(self, model: Model, reason: str) -> Model:
        """Records that this node unloaded the model on its own account (`reason`: eviction, idle,
        quota, reconcile), so that reconciliation does not load it back; a request, a preload or
        an operator may."""
        ...

    async def refused(self, model: Model, message: str) -> Model:
        """Records that this node cannot hold the model now (its budget is full of what matters
        more): a single node records nothing (a later request or reconciliation tries again); a
        node of a fleet releases its copy at this generation, so the placer places it elsewhere."""
        ...


class RegistryStates:
    """The state writer of one node holding every model: the registry's model records it all."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    async def transition(self, model: Model, to_state: ModelState, message: str = "", **fields: Any) -> Model:
        return await self.registry.transition(model, to_state, message, **fields)

    async def wish(self, name: str, desired: DesiredState) -> Model:
        return await self.registry.set_desired_state(name, desired)

    async def release(self, model: Model, reason: str) -> Model:
        if model.desired_state in (DesiredState.UNLOADED, DesiredState.HELD_UNLOADED):
            return model
        return await self.registry.set_desired_state(model.name, DesiredState.UNLOADED)

    async def refused(self, model: Model, message: str) -> Model:
        return model


class ShadowStates:
    """The state writer of a refresh beside a served copy: its transitions apply to a copy of the
    model, so the registry keeps the served model READY while the new copy is fetched, verified and
    converted; what staging recorded (manifest, profile, assets) waits here for the switch."""

    def __init__(self) -> None:
        self.assets: list[ModelAsset] | None = None
        self.phase_durations: list[PhaseDuration] = []
        self._since = time.monotonic()

    async def transition(
        self,
        model: Model,
        to_state: ModelState,
        message: str = "",
        *,
        manifest: PackageManifest | None = None,
        profile: ServingProfile | None = None,
        assets: Sequence[ModelAsset] | None = None,
        progress_only: bool = False,
        **_: Any,
    ) -> Model:
        if progress_only:
            return model
        now = time.monotonic()
        if to_state != model.state:
            if model.state in WORKING_STATES:
                self.phase_durations.append(
                    PhaseDuration(phase=model.state, duration=timedelta(seconds=now - self._since))
                )
            self._since = now
        status = model.status.model_copy(update={"state": to_state, "reason": message})
        if manifest is not None:
            status.manifest = manifest
        if profile is not None:
            status.profile = profile
        if assets is not None:
            self.assets = list(assets)
        return model.model_copy(update={"status": status})


class NodeHolder(Protocol):
    """Which node this process holds, and under which incarnation (0: none now)."""

    @property
    def node_id(self) -> str: ...

    @property
    def incarnation(self) -> int: ...


def node_view(model: Model, placement: Placement | None, incarnation: int) -> Model:
    """The model as this node sees it: its state is that of this node's copy. A copy that is not
    placed here, or whose state an earlier process of this node recorded, holds nothing here."""
    status = model.status.model_copy()
    if placement is not None and placement.status.incarnation == incarnation:
        copy = placement.status
        status.state, status.reason, status.progress = copy.state, copy.reason, copy.progress
        status.phase_durations = list(copy.phase_durations)
    else:
        status.state = ModelState.REGISTERED
        status.reason = "not placed on this node" if placement is None else "placed on this node; not loaded yet"
        status.progress, status.phase_durations = None, []
    return model.model_copy(update={"status": status})


class PlacementStates:
    """The state writer of a node of a fleet: each transition is this node's placement transition,
    under the incarnation that holds the node now (the registry refuses a lost one), and the
    model's status users see is derived by the registry from every copy. A copy this node let go
    on its own account is recorded STAGED, evicted, at the placement's generation: it is not loaded
    again until the placer asks anew (a new generation). `wish` stays model-level: it is what an
    operator or a request asked of the model, not of this copy."""

    def __init__(self, registry: RegistryClient, node: NodeHolder) -> None:
        self.registry = registry
        self.node = node
        self._placements: dict[str, Placement] = {}
        self._releasing: set[str] = set()  # let go on this node's account: the next STAGED says evicted

    def remember(self, placements: Sequence[Placement], *, complete: bool = False) -> None:
        """What the registry says of this node's placements; `complete`: all of them."""
        if complete:
            self._placements = {}
        for placement in placements:
            self._placements[placement.model_name] = placement

    def forget(self, name: str) -> None:
        self._placements.pop(name, None)

    async def placement(self, name: str) -> Placement | None:
        placement = self._placements.get(name)
        if placement is None:
            found = await self.registry.list_placements(model_names=[name], node_ids=[self.node.node_id])
            placement = found[0] if found else None
            if placement is not None:
                self._placements[name] = placement
        return placement

    async def get_model(self, name: str) -> Model:
        """The model with this node's copy's state (what the residency reads)."""
        model = await self.registry.get_model(name)
        return node_view(model, await self.placement(name), self.node.incarnation)

    async def transition(
        self,
        model: Model,
        to_state: ModelState,
        message: str = "",
        *,
        evicted: bool = False,
        **fields: Any,
    ) -> Model:
        placement = await self.placement(model.name)
        if placement is None:
            raise PlacementNotFound(
                f"Model '{model.name}' is not placed on node '{self.node.node_id}': the placer decides where a "
                "model runs (it places every model an operator or a request wants loaded).",
                metadata={"model": model.name, "node": self.node.node_id},
            )
        incarnation = self.node.incarnation
        stale = placement.status.incarnation not in (0, incarnation)
        steps: list[tuple[ModelState, str]] = []
        state = placement.status.state
        if stale and state != ModelState.REGISTERED and to_state != ModelState.REGISTERED:
            # An earlier process of this node recorded this copy's state: that process is gone, and
            # what it recorded holds nothing here now. Start the copy over under this incarnation.
            steps.append((ModelState.REGISTERED, f"taken over by incarnation {incarnation}"))
            state = ModelState.REGISTERED
        if state == ModelState.REGISTERED and not fields.get("progress_only"):
            # A copy new to this node (or taken over) whose files this node's cache already holds:
            # its load goes on to STAGED or LOADING at once; record the steps the lifecycle asks for.
            steps += [(step, "found in this node's cache") for step in path_before(state, to_state)]
        for step, why in steps:
            placement, _ = await self.registry.transition_placement(placement, incarnation, step, why)
        if to_state == ModelState.STAGED and model.name in self._releasing and not fields.get("progress_only"):
            self._releasing.discard(model.name)
            evicted = True
        acted = evicted or to_state in (ModelState.READY, ModelState.FAILED)
        try:
            placement, aggregate = await self.registry.transition_placement(
                placement,
                incarnation,
                to_state,
                message,
                evicted=evicted,
                observed_generation=placement.generation if acted else 0,
                **fields,
            )
        except NotFound as missing:
            if missing.reason == PlacementNotFound.reason:
                self.forget(model.name)  # the placer removed it: reconciliation unloads the copy
            raise
        self._placements[model.name] = placement
        return node_view(aggregate, placement, incarnation)

    async def wish(self, name: str, desired: DesiredState) -> Model:
        if desired == DesiredState.LOADED:
            self._releasing.discard(name)
        else:
            self._releasing.add(name)
        model = await self.registry.set_desired_state(name, desired)
        return node_view(model, await self.placement(name), self.node.incarnation)

    async def release(self, model: Model, reason: str) -> Model:
        if model.state in (ModelState.READY, ModelState.LOADING, ModelState.UNLOADING):
            self._releasing.add(model.name)  # the STAGED that ends the unload records it
            return model
        placement = await self.placement(model.name)
        if placement is None or placement.status.incarnation != self.node.incarnation:
            return model
        return await self.transition(model, model.state, f"let go on this node: {reason}", evicted=True)

    async def refused(self, model: Model, message: str) -> Model:
        placement = await self.placement(model.name)
        if placement is None:
            return model
        return await self.transition(
            model, model.state, f"does not fit on node {self.node.node_id}: {message}", evicted=True
        )
