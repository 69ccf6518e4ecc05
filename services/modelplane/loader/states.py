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
