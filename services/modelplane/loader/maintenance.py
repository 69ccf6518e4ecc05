"""The periodic budget work of one node: with fresh request statistics and measurements, decide
what to unload (over its quota, idle past its TTL, over the budget) and what to preload.

It returns decisions and carries out none of them: the node's residency does (`carry_out`).
What it changes is the budget's bookkeeping only: a model it decides to unload is marked
UNLOADING at once, and a preload's bytes are claimed, so the next plan does not count on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from modelplane.common.types import DesiredState, Model, ModelState, Priority
from modelplane.loader.budget import Claim, Holder, effective, eviction_order
from modelplane.loader.decisions import Decision, Preload, Unload
from modelplane.loader.memory import MemoryManager
from modelplane.loader.preload import Candidate, PreloadPolicy, forecast
from modelplane.loader.settings import LoaderSettings
from modelplane.registry.statistics import ModelStatistics

log = structlog.get_logger()


class BudgetMaintenance:
    def __init__(self, settings: LoaderSettings, memory: MemoryManager) -> None:
        self.settings = settings
        self.memory = memory
        self.preloader = PreloadPolicy(
            settings.preload_horizon_seconds,
            settings.preload_min_expected_requests,
            settings.preload_hysteresis,
            settings.preload_protect_seconds,
        )

    async def decide(
        self, statistics: Sequence[ModelStatistics], models: Sequence[Model], *, loads_running: int, preloading: bool
    ) -> list[Decision]:
        """One round: the decisions to carry out now, most urgent first. `models` is the catalogue
        (read only when preloading is on); `loads_running` and `preloading` say what the
        residency is doing, since a preload only takes an idle load slot, one at a time."""
        memory = self.memory
        await memory.refresh_devices()
        memory.note_usage(statistics)
        decisions: list[Decision] = [*self._over_quota(await memory.remeasure())]
        decisions += self._expire_idle()
        decisions += self._stay_within_budget()
        idle_slot = loads_running < self.settings.max_concurrent_loads and not memory.waiting
        if self.settings.preload and idle_slot and not preloading and not memory.budget.claims:
            decisions += await self._preload(models)
        memory.publish_metrics()
        return decisions

    def _over_quota(self, measured: Sequence[Holder]) -> list[Decision]:
        decisions: list[Decision] = []
        for holder in measured:
            over = self.memory.over_quota(holder)
            if over is None:
                continue
            log.warning("model over its memory quota; unloading it", model=holder.name, error=over.message)
            self.memory.unloading(holder.name)
            decisions.append(Unload(holder.name, "quota", over.message))
        return decisions

    def _expire_idle(self) -> list[Decision]:
        now = self.memory.clock()
        decisions: list[Decision] = []
        for holder in list(self.memory.budget.holders.values()):
            ttl = holder.idle_ttl_seconds
            if holder.state == ModelState.READY and ttl and now - holder.last_used > ttl:
                log.info("unloading idle model", model=holder.name, idle_seconds=round(now - holder.last_used))
                self.memory.unloading(holder.name)
                decisions.append(Unload(holder.name, "idle"))
        return decisions

    def _stay_within_budget(self) -> list[Decision]:
        """Measurements can exceed estimates; evict (lowest class, least recent first) until each
        device is back within its budget."""
        budget = self.memory.budget
        decisions: list[Decision] = []
        for device in budget.devices:
            excess = budget.committed(device) - budget.devices[device].capacity_bytes
            if excess <= 0:
                continue
            ready = [
                h
                for h in budget.holders.values()
                if device in h.devices and h.state == ModelState.READY and effective(h.priority) != Priority.PINNED
            ]
            victims = []
            for holder in sorted(ready, key=eviction_order):
                if excess <= 0:
                    break
                victims.append(holder)
                excess -= holder.bytes
            if victims:
                log.warning("over budget; evicting", device=device, models=[v.name for v in victims])
                decisions += self.memory.evict(victims, "", "over-budget")
        return decisions

    async def _preload(self, models: Sequence[Model]) -> list[Decision]:
        memory = self.memory
        now = memory.clock()
        rates = forecast(memory.statistics, datetime.fromtimestamp(now, UTC), self.preloader.horizon_seconds)
        candidates = [
            Candidate(
                name=m.name,
                bytes=memory.footprint(m)[0],
                priority=effective(m.spec.priority),
                devices=memory.placement(m),
                idle_ttl_seconds=memory.idle_ttl(m),
            )
            for m in models
            if m.state == ModelState.STAGED
            and m.desired_state != DesiredState.HELD_UNLOADED  # an operator's unload holds
            and m.name not in memory.budget.holders
            and m.name in rates
        ]
        async with memory.changed:
            choice = self.preloader.choose(rates, candidates, memory.budget, now)
            if choice is None:
                return []
            c = choice.candidate
            memory.claim(Claim(c.name, c.bytes, c.priority, c.devices, [v.name for v in choice.victims]))
            log.info(
                "preloading",
                model=c.name,
                expected_per_minute=round(choice.rate * 60, 2),
                displacing=[v.name for v in choice.victims],
            )
            evictions = memory.evict(choice.victims, c.name, "preload")
        return [*evictions, Preload(c.name)]
