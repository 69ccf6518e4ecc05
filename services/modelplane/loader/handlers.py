"""The loader's core behind its gRPC edge: this node's residency, its reconciliation and its
periodic budget work, wired together, and the background loops that drive them.

Every load, unload and state write runs in `NodeResidency` (residency.py). Reconciliation
(reconcile.py), the periodic budget work (maintenance.py) and the registry watch decide, and hand
their decisions to the residency to carry out; memory.py admits loads into the budget and measures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import DesiredState, Model, ModelState
from modelplane.loader.decisions import Decision, Discard, Load
from modelplane.loader.maintenance import BudgetMaintenance
from modelplane.loader.memory import DeviceReport, MemoryManager
from modelplane.loader.pipeline import LoadPipeline
from modelplane.loader.reconcile import CatalogueDesire, Reconciler, ReconcileResult
from modelplane.loader.residency import NodeResidency
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.states import RegistryStates
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.watch import ChangeType

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
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.triton = triton
        self.repository = repository
        # Without a way to see the backends' processes or GPUs: host memory, estimated footprints.
        self.memory = memory = memory or MemoryManager(settings, repository, processes=None, gpus=None)
        self.residency = NodeResidency(
            settings, registry, RegistryStates(registry), pipeline, triton, repository, memory
        )
        self.reconciler = Reconciler(CatalogueDesire(registry), triton, memory)
        self.maintenance = BudgetMaintenance(settings, memory)
        self._background: list[asyncio.Task[None]] = []

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

    def start_background(self) -> None:
        self._background = [
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
                models = await self.registry.list_models() if self.settings.preload else []
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
                async for change in self.registry.watch(include_initial=False):
                    backoff = 0.5
                    await self.residency.carry_out(self._on_change(change.change_type, change.model))
            except ModelplaneError as error:
                log.warning("registry watch interrupted; reconnecting", error=error.message, in_seconds=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            await self._reconcile_quietly()

    def _on_change(self, change_type: ChangeType, model: Model) -> list[Decision]:
        if change_type == ChangeType.DELETED:
            return [Discard(model.name, unload=True)]
        self.memory.update_spec(model)
        if (
            change_type == ChangeType.REGISTERED
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
            await asyncio.sleep(1.0)
            since_reconcile += 1.0
