"""The loader's core behind its gRPC edge: this node's residency, its reconciliation and its
periodic budget work, wired together, and the background loops that drive them.

Every load, unload and state write runs in `NodeResidency` (residency.py). Reconciliation
(reconcile.py), the periodic budget work (maintenance.py) and the registry watch decide, and hand
their decisions to the residency to carry out; memory.py admits loads into the budget and measures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import DesiredState, Model, ModelState
from modelplane.common.waiting import wait_set
from modelplane.loader.decisions import Decision, Discard, Load
from modelplane.loader.maintenance import BudgetMaintenance
from modelplane.loader.memory import DeviceReport, MemoryManager
from modelplane.loader.node import NodeAgent
from modelplane.loader.pipeline import LoadPipeline
from modelplane.loader.reconcile import CatalogueDesire, DesiredSource, PlacementDesire, Reconciler, ReconcileResult
from modelplane.loader.residency import NodeResidency
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.states import ModelReader, PlacementStates, RegistryStates, StateWriter
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.watch import Change, ChangeType, ModelChange, PlacementChange

log = structlog.get_logger()


class LoaderHandler:
    def __init__(
        self,
        settings: LoaderSettings,
        registry: RegistryClient,
        pipeline: LoadPipeline,
        triton: TritonControl,
        repository: ModelRepository,
        memory: MemoryManager | None = None,
        *,
        triton_address: str = "",
        loader_port: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.triton = triton
        self.repository = repository
        # Without a way to see the backends' processes or GPUs: host memory, estimated footprints.
        self.memory = memory = memory or MemoryManager(settings, repository, processes=None, gpus=None)
        self.node = NodeAgent(
            settings, registry, memory, triton_address=triton_address or triton.address, loader_port=loader_port
        )
        self.node.on_lost = self._on_node_lost
        # A single node holds every model the registry wants loaded and records model states; a
        # node of a fleet holds its placements and records its copies' states (docs/FLEET.md).
        states: StateWriter
        desired: DesiredSource
        reader: ModelReader
        if settings.fleet:
            self.placements: PlacementStates | None = PlacementStates(registry, self.node)
            states = desired_states = self.placements
            reader, desired = desired_states, PlacementDesire(registry, desired_states)
        else:
            self.placements = None
            states, reader, desired = RegistryStates(registry), registry, CatalogueDesire(registry)
        self.residency = NodeResidency(settings, reader, states, pipeline, triton, repository, memory)
        self.reconciler = Reconciler(desired, triton, memory)
        self.maintenance = BudgetMaintenance(settings, memory)
        self._background: list[asyncio.Task[None]] = []
        self._kick = asyncio.Event()  # a placement of this node changed: reconcile now

    # The operations of the loader's API -----------------------------------------------------

    def load(
        self,
        name: str,
        *,
        timeout_seconds: float | None = None,
        refresh: bool = False,
        reason: str = "operator",
        request_id: str = "",
    ) -> AsyncIterator[LoadUpdate]:
        return self.residency.load(
            name, timeout_seconds=timeout_seconds, refresh=refresh, reason=reason, request_id=request_id
        )

    async def unload(self, name: str, *, reason: str = "operator") -> Model:
        return await self.residency.unload(name, reason=reason)

    async def cancel(self, name: str) -> bool:
        return await self.residency.cancel(name)

    async def budget(self) -> tuple[list[DeviceReport], int]:
        if not self.memory.budget.devices:
            await self.memory.refresh_devices()
        return self.memory.report(), self.memory.waiting

    # Reconciliation ------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        """Converges this node: loads what it should hold, unloads what it should not, corrects
        states a crash or a Triton restart left untrue, and rebuilds the budget from Triton."""
        plan = await self.reconciler.plan(self.residency.busy)
        await self.residency.carry_out([*plan.resets, *plan.loads])
        for unload in plan.unloads:
            for task in await self.residency.carry_out([unload]):
                await task
        result = plan.result
        if result.loaded or result.unloaded:
            log.info("reconciled", loaded=result.loaded, unloaded=result.unloaded)
        return result

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except ModelplaneError as error:
            log.warning("reconciliation postponed", error=error.message)

    # Background work -----------------------------------------------------------------------

    async def register_node(self) -> None:
        """Registers this node of a fleet: it must hold its id to start (a second process with a
        live id is refused). A single node does not register: a registered node is one the placer
        places copies on, and a single node holds every model wanted loaded on its own, recording
        model states, which the registry refuses for a model placed on a node."""
        if self.settings.fleet:
            await self.node.register()

    async def _on_node_lost(self) -> None:
        """Registered again under a new incarnation: what the old one recorded holds nothing now."""
        if self.placements is not None:
            self.placements.remember([], complete=True)
        self._kick.set()

    def start_background(self) -> None:
        self._background = [
            *([asyncio.create_task(self.node.keep_lease(), name="node-lease")] if self.settings.fleet else []),
            asyncio.create_task(self._watch_registry(), name="watch-registry"),
            asyncio.create_task(self._watch_triton(), name="watch-triton"),
            asyncio.create_task(self._maintain_forever(), name="maintain-budget"),
        ]

    async def stop_background(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.residency.stop()

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.statistics_interval_seconds)
            try:
                statistics = await self.registry.statistics()
                # On a fleet the placer decides what each node holds: no node preloads on its own.
                preload = self.settings.preload and not self.settings.fleet
                models = await self.registry.list_models() if preload else []
                decisions = await self.maintenance.decide(
                    statistics,
                    models,
                    loads_running=len(self.residency.jobs),
                    preloading=self.residency.preloading(),
                )
                await self.residency.carry_out(decisions)
            except ModelplaneError as error:
                log.warning("budget maintenance postponed", error=error.message)

    async def _watch_registry(self) -> None:
        backoff = 0.5
        while True:
            try:
                async for change in self._changes():
                    backoff = 0.5
                    if isinstance(change, PlacementChange):
                        self._kick.set()  # level-triggered: the next round reads every placement again
                    elif isinstance(change, ModelChange):
                        await self.residency.carry_out(self._on_change(change.change_type, change.model))
            except ModelplaneError as error:
                log.warning("registry watch interrupted; reconnecting", error=error.message, in_seconds=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            await self._reconcile_quietly()

    def _changes(self) -> AsyncIterator[Change]:
        if self.settings.fleet:
            return self.registry.watch_fleet(node_ids=[self.node.node_id], include_initial=False, include_nodes=False)
        return self.registry.watch(include_initial=False)

    def _on_change(self, change_type: ChangeType, model: Model) -> list[Decision]:
        if change_type == ChangeType.DELETED:
            return [Discard(model.name, unload=True)]
        self.memory.update_spec(model)
        if (
            not self.settings.fleet  # on a fleet, a placement says what to load
            and change_type == ChangeType.REGISTERED
            and model.desired_state == DesiredState.LOADED
            and model.state == ModelState.REGISTERED
            and model.name not in self.residency.jobs
        ):
            return [Load(model, "registered")]
        return []

    async def _watch_triton(self) -> None:
        """Reconciles at start, whenever Triton comes back after being gone, and periodically."""
        was_live = False
        since_reconcile = float("inf")
        while True:
            live = await self.triton.is_live()
            if live and (not was_live or since_reconcile >= self.settings.reconcile_interval_seconds):
                if not was_live:
                    log.info("triton is live; reconciling")
                await self._reconcile_quietly()
                since_reconcile = 0.0
            if was_live and not live:
                log.warning("triton is gone; models will be reloaded when it is back")
            was_live = live
            await wait_set(self._kick, 1.0)
            since_reconcile += 1.0
            if self._kick.is_set():
                self._kick.clear()  # with Triton gone, the round when it is back covers it
                if live:
                    await self._reconcile_quietly()
                    since_reconcile = 0.0
