"""The loader's memory decisions: admitting a load into the budget (evicting, then waiting for the
memory to be actually free), measuring what a loaded model holds, and the periodic work —
recency from request statistics, quotas, idle expiry, staying within budget, and preloading.

It decides; the handler acts. Unloads and preloads are asked of the handler through the two
callables it passes in, so one place runs every load and every unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from modelplane.common.types import Model, ModelState, Priority, RuntimeTarget
from modelplane.loader import metrics
from modelplane.loader.budget import Claim, Holder, MemoryBudget, effective, eviction_order, mib
from modelplane.loader.devices import HOST, DeviceMemory, GpuMemoryReader, host_memory
from modelplane.loader.errors import BudgetExceeded, QuotaExceeded
from modelplane.loader.footprint import BackendProcesses, estimate_footprint
from modelplane.loader.preload import Candidate, PreloadPolicy, forecast
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import ModelRepository
from modelplane.registry.statistics import ModelStatistics

log = structlog.get_logger()

# Asks the handler to unload a model: (name, reason, detail: the model it makes room for, or why).
StartUnload = Callable[[str, str, str], object]
# Asks the handler to preload a model.
StartPreload = Callable[[str], object]
Publish = Callable[[str], None]

_RECHECK_SECONDS = 0.5


@dataclass(frozen=True)
class HolderReport:
    name: str
    bytes: int
    measured: bool
    priority: Priority
    state: ModelState
    idle_seconds: float
    quota_bytes: int


@dataclass(frozen=True)
class DeviceReport:
    device: str
    total_bytes: int
    capacity_bytes: int
    used_bytes: int
    shared_bytes: int
    claimed_bytes: int
    observed_used_bytes: int
    holders: list[HolderReport] = field(default_factory=list)


class MemoryManager:
    def __init__(
        self,
        settings: LoaderSettings,
        repository: ModelRepository,
        *,
        processes: BackendProcesses | None,
        gpus: GpuMemoryReader | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.processes = processes
        self.gpus = gpus
        self.clock = clock
        self.budget = MemoryBudget()
        self.changed = asyncio.Condition()
        self.observed: dict[str, DeviceMemory] = {}
        self.statistics: dict[str, ModelStatistics] = {}
        self.preloader = PreloadPolicy(
            settings.preload_horizon_seconds,
            settings.preload_min_expected_requests,
            settings.preload_hysteresis,
            settings.preload_protect_seconds,
        )
        self.waiting = 0
        self._runtime_measured = False  # the shared runtime's bytes, measured once a stub runs
        # Set by the handler, which runs every load and unload.
        self.start_unload: StartUnload = lambda name, reason, detail: None
        self.start_preload: StartPreload = lambda name: None

    # Devices --------------------------------------------------------------------------------

    async def refresh_devices(self) -> None:
        margin = 1.0 - self.settings.memory_safety_margin
        host = host_memory()
        self.observed[HOST] = host
        total = self.settings.host_memory_bytes or host.total_bytes
        self.budget.set_device(HOST, total, int(total * margin))
        if self.processes is not None and not self._runtime_measured:
            self.budget.set_shared(HOST, self.settings.estimate_runtime_bytes)
        for gpu in await self.gpus.read() if self.gpus else []:
            self.observed[gpu.device] = gpu
            total = self.settings.gpu_memory_bytes or gpu.total_bytes
            self.budget.set_device(gpu.device, total, int(total * margin))
        self.publish_metrics()

    def placement(self, model: Model) -> tuple[str, ...]:
        """The devices a model's memory lives on: every GPU for a GPU target (Triton places a
        KIND_GPU instance group on each GPU), else host memory."""
        target = model.spec.runtime_hints.target or self.settings.default_target
        gpus = tuple(d for d in self.budget.devices if d.startswith("gpu:"))
        return gpus if target != RuntimeTarget.EMBEDDED and gpus else (HOST,)

    def footprint(self, model: Model) -> tuple[int, bool]:
        """Bytes the budget counts for a model before it is loaded, and whether they were measured."""
        if model.status.footprint_bytes:
            return model.status.footprint_bytes, True
        entry = self.repository.entry_path(model.name)
        return estimate_footprint(model, entry, self.settings.estimate_overhead_bytes), False

    def _observed_room(self, nbytes: int, devices: Sequence[str]) -> bool:
        """Whether each device itself reports the bytes free, beyond what the budget believes:
        memory used outside modelplane is memory a load cannot have."""
        if HOST in devices:
            self.observed[HOST] = host_memory()
        return all(d not in self.observed or self.observed[d].free_bytes >= nbytes for d in devices)

    # Admission ------------------------------------------------------------------------------

    async def admit(self, model: Model, publish: Publish) -> Holder:
        """Reserves the model's memory, evicting what the policy allows, and returns once that
        memory is actually free; raises BudgetExceeded when it cannot be had in time."""
        if not self.budget.devices:
            await self.refresh_devices()
        name = model.name
        nbytes, measured = self.footprint(model)
        devices = self.placement(model)
        priority = effective(model.spec.priority)
        deadline = asyncio.get_running_loop().time() + self.settings.memory_wait_seconds
        self.note_waiting(+1)
        try:
            async with self.changed:
                while True:
                    claim = self.budget.claims.get(name)
                    if claim is None:
                        plan = self.budget.plan(name, nbytes, priority, devices)
                        if plan.must_wait:
                            publish(f"waiting for {mib(nbytes)}: other loads hold the memory it needs")
                            await self._wait(deadline, name, nbytes, priority, devices)
                            continue
                        claim = Claim(name, nbytes, priority, devices, [v.name for v in plan.victims])
                        self.budget.claim(claim)
                        self._evict(plan.victims, name, "load")
                    if self.budget.fits_physically(claim.bytes, devices) and self._observed_room(claim.bytes, devices):
                        self.budget.drop_claim(name)
                        holder = self._holder(model, claim.bytes, measured, devices, ModelState.LOADING)
                        self.budget.hold(holder)
                        self.publish_metrics()
                        return holder
                    if claim.victims:
                        publish(f"waiting for {mib(claim.bytes)} to be freed: unloading {', '.join(claim.victims)}")
                    await self._wait(deadline, name, claim.bytes, priority, devices)
        except BaseException:
            async with self.changed:
                self.budget.drop_claim(name)
                self.changed.notify_all()
            raise
        finally:
            self.note_waiting(-1)

    def _holder(self, model: Model, nbytes: int, measured: bool, devices: tuple[str, ...], state: ModelState) -> Holder:
        now = self.clock()
        return Holder(
            name=model.name,
            bytes=nbytes,
            priority=effective(model.spec.priority),
            devices=devices,
            state=state,
            last_used=self._last_request(model.name) or now,
            measured=measured,
            quota_bytes=model.spec.memory_quota_bytes,
            idle_ttl_seconds=self._idle_ttl(model),
            loaded_at=now,
        )

    def _idle_ttl(self, model: Model) -> float:
        if effective(model.spec.priority) == Priority.PINNED:
            return 0.0
        ttl = model.spec.idle_ttl
        return ttl.total_seconds() if ttl is not None else self.settings.idle_ttl_seconds

    async def _wait(self, deadline: float, name: str, nbytes: int, priority: Priority, devices: Sequence[str]) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self._timed_out(name, nbytes, priority, devices)
        # Woken by every change of the budget; re-checked regularly for memory freed outside it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, _RECHECK_SECONDS))

    def _timed_out(self, name: str, nbytes: int, priority: Priority, devices: Sequence[str]) -> BudgetExceeded:
        waited = self.settings.memory_wait_seconds
        for device in devices:
            observed = self.observed.get(device)
            if self.budget.fits_physically(nbytes, [device]) and observed and observed.free_bytes < nbytes:
                return BudgetExceeded(
                    f"Model '{name}' needs {mib(nbytes)} on {device}; the budget has room but the device itself "
                    f"reports only {mib(observed.free_bytes)} free after {waited:.0f} s, so something outside "
                    "modelplane holds the memory. Free it, or lower the budget to what the device can really give.",
                    metadata={"model": name, "device": device, "needed_bytes": str(nbytes)},
                    retry_after_seconds=10.0,
                )
        refusal = self.budget.refusal(name, nbytes, priority, devices)
        refusal.message = f"Waited {waited:.0f} s for memory in vain. " + refusal.message
        refusal.args = (refusal.message,)
        return refusal

    def note_waiting(self, delta: int) -> None:
        """Counts loads waiting for a load slot or for memory."""
        self.waiting += delta
        metrics.LOADS_WAITING.set(self.waiting)

    def _evict(self, victims: Sequence[Holder], for_model: str, why: str) -> None:
        now = self.clock()
        for victim in victims:
            victim.state = ModelState.UNLOADING  # now, so no other plan counts on it
            metrics.EVICTIONS.labels(why).inc()
            metrics.EVICTION_AGE.observe(max(0.0, now - victim.last_used))
            log.info("evicting", model=victim.name, for_model=for_model, why=why, idle_seconds=now - victim.last_used)
            self.start_unload(victim.name, "eviction", for_model)

    # Measurement ----------------------------------------------------------------------------

    async def measure(self, holder: Holder, model: Model) -> int:
        """The footprint of a model just loaded; refuses it when over its quota. 0 when the
        model's processes are not visible (an external Triton): the estimate stays."""
        if self.processes is None:
            return 0
        resident = await self.processes.measure()
        measured = resident.own.get(model.name)
        if measured is None:
            return 0
        async with self.changed:
            holder.bytes, holder.measured = measured, True
            self._note_shared(resident.shared_bytes)
            self.changed.notify_all()
        self._check_quota(holder)
        return measured

    def _note_shared(self, nbytes: int) -> None:
        """The backend runtime's shared pages on the host: the first measurement replaces the
        estimate; then they stay counted (once) at their largest, since models touch different
        pages of the libraries and a load onto an emptied device brings them back."""
        if HOST in self.budget.devices and nbytes:
            known = self.budget.devices[HOST].shared_bytes if self._runtime_measured else 0
            self.budget.set_shared(HOST, max(nbytes, known))
            self._runtime_measured = True

    def _check_quota(self, holder: Holder) -> None:
        if holder.quota_bytes and holder.bytes > holder.quota_bytes:
            raise QuotaExceeded(
                f"Model '{holder.name}' holds {mib(holder.bytes)} ({holder.bytes} bytes) once loaded, over its memory "
                f"quota of {mib(holder.quota_bytes)} ({holder.quota_bytes} bytes); it was unloaded. Raise its "
                "memory_quota_bytes if that much is expected, or serve a smaller model.",
                metadata={
                    "model": holder.name,
                    "measured_bytes": str(holder.bytes),
                    "quota_bytes": str(holder.quota_bytes),
                },
            )

    async def loaded(self, holder: Holder) -> None:
        async with self.changed:
            holder.state = ModelState.READY
            holder.last_used = max(holder.last_used, self.clock())
            self.changed.notify_all()
        metrics.MODEL_FOOTPRINT_BYTES.labels(holder.name).set(holder.bytes)
        self.publish_metrics()

    async def wait_released(self, name: str) -> None:
        """Returns once the model's backend processes have exited (its memory is back), or after
        the release wait, whichever is first."""
        if self.processes is None:
            return
        deadline = asyncio.get_running_loop().time() + self.settings.release_wait_seconds
        while await self.processes.running(name):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("backend process still alive after unload; counting its memory free", model=name)
                return
            await asyncio.sleep(0.1)

    async def release(self, name: str) -> Holder | None:
        async with self.changed:
            holder = self.budget.release(name)
            self.changed.notify_all()
        if holder is not None:
            _forget_footprint(name)
        self.publish_metrics()
        return holder

    async def sync_with_triton(self, ready: dict[str, Model], busy: set[str]) -> None:
        """After reconciliation: every model READY in Triton holds memory, nothing else does
        (except loads and unloads in flight)."""
        async with self.changed:
            for name in list(self.budget.holders):
                if name not in ready and name not in busy:
                    self.budget.release(name)
                    _forget_footprint(name)
            if not self.budget.devices:
                await self.refresh_devices()
            for name, model in ready.items():
                if name not in self.budget.holders and name not in busy:
                    nbytes, measured = self.footprint(model)
                    self.budget.hold(self._holder(model, nbytes, measured, self.placement(model), ModelState.READY))
            self.changed.notify_all()
        self.publish_metrics()

    def update_spec(self, model: Model) -> None:
        """Takes a changed priority, quota or idle TTL into account for a resident model."""
        holder = self.budget.holders.get(model.name)
        if holder is not None:
            holder.priority = effective(model.spec.priority)
            holder.quota_bytes = model.spec.memory_quota_bytes
            holder.idle_ttl_seconds = self._idle_ttl(model)

    # Periodic work --------------------------------------------------------------------------

    def _last_request(self, name: str) -> float | None:
        stats = self.statistics.get(name)
        return stats.last_request_time.timestamp() if stats and stats.last_request_time else None

    async def maintain(
        self, statistics: list[ModelStatistics], models: list[Model], *, loads_running: int, preloading: bool
    ) -> None:
        """One round of periodic work, with fresh request statistics and the registry's models."""
        await self.refresh_devices()
        self.statistics = {s.model_name: s for s in statistics}
        for holder in self.budget.holders.values():
            last = self._last_request(holder.name)
            if last:
                holder.last_used = max(holder.last_used, last)
        await self._remeasure()
        self._expire_idle()
        self._stay_within_budget()
        # A preload only takes an idle load slot, one at a time, never ahead of a load that waits.
        idle_slot = loads_running < self.settings.max_concurrent_loads and not self.waiting
        if self.settings.preload and idle_slot and not preloading and not self.budget.claims:
            await self._preload(models)
        self.publish_metrics()

    async def _remeasure(self) -> None:
        if self.processes is None:
            return
        resident = await self.processes.measure()
        self._note_shared(resident.shared_bytes)
        for holder in [h for h in self.budget.holders.values() if h.state == ModelState.READY]:
            measured = resident.own.get(holder.name)
            if measured is None:
                continue
            holder.bytes, holder.measured = measured, True
            metrics.MODEL_FOOTPRINT_BYTES.labels(holder.name).set(measured)
            try:
                self._check_quota(holder)
            except QuotaExceeded as over:
                log.warning("model over its memory quota; unloading it", model=holder.name, error=over.message)
                holder.state = ModelState.UNLOADING
                self.start_unload(holder.name, "quota", over.message)

    def _expire_idle(self) -> None:
        now = self.clock()
        for holder in list(self.budget.holders.values()):
            ttl = holder.idle_ttl_seconds
            if holder.state == ModelState.READY and ttl and now - holder.last_used > ttl:
                log.info("unloading idle model", model=holder.name, idle_seconds=round(now - holder.last_used))
                holder.state = ModelState.UNLOADING
                self.start_unload(holder.name, "idle", "")

    def _stay_within_budget(self) -> None:
        """Measurements can exceed estimates; evict (lowest class, least recent first) until each
        device is back within its budget."""
        for device in self.budget.devices:
            excess = self.budget.committed(device) - self.budget.devices[device].capacity_bytes
            if excess <= 0:
                continue
            ready = [
                h
                for h in self.budget.holders.values()
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
                self._evict(victims, "", "over-budget")

    async def _preload(self, models: list[Model]) -> None:
        rates = forecast(self.statistics, datetime.fromtimestamp(self.clock(), UTC), self.preloader.horizon_seconds)
        candidates = [
            Candidate(
                name=m.name,
                bytes=self.footprint(m)[0],
                priority=effective(m.spec.priority),
                devices=self.placement(m),
                idle_ttl_seconds=self._idle_ttl(m),
            )
            for m in models
            if m.state == ModelState.STAGED and m.name not in self.budget.holders and m.name in rates
        ]
        async with self.changed:
            choice = self.preloader.choose(rates, candidates, self.budget, self.clock())
            if choice is None:
                return
            c = choice.candidate
            self.budget.claim(Claim(c.name, c.bytes, c.priority, c.devices, [v.name for v in choice.victims]))
            log.info(
                "preloading",
                model=c.name,
                expected_per_minute=round(choice.rate * 60, 2),
                displacing=[v.name for v in choice.victims],
            )
            self._evict(choice.victims, c.name, "preload")
        self.start_preload(c.name)

    async def drop_claim(self, name: str) -> None:
        async with self.changed:
            if self.budget.drop_claim(name):
                self.changed.notify_all()

    # Reports --------------------------------------------------------------------------------

    def publish_metrics(self) -> None:
        for name, device in self.budget.devices.items():
            used = self.budget.used(name)
            metrics.BUDGET_BYTES.labels(name, "capacity").set(device.capacity_bytes)
            metrics.BUDGET_BYTES.labels(name, "used").set(used)
            metrics.BUDGET_BYTES.labels(name, "free").set(max(0, device.capacity_bytes - used))
            metrics.BUDGET_BYTES.labels(name, "claimed").set(self.budget.claimed(name))
            metrics.BUDGET_BYTES.labels(name, "shared").set(self.budget.shared(name))

    def report(self) -> list[DeviceReport]:
        now = self.clock()
        reports = []
        for name, device in self.budget.devices.items():
            observed = self.observed.get(name)
            holders = [
                HolderReport(
                    h.name, h.bytes, h.measured, h.priority, h.state, max(0.0, now - h.last_used), h.quota_bytes
                )
                for h in self.budget.least_recently_used()
                if name in h.devices
            ]
            reports.append(
                DeviceReport(
                    device=name,
                    total_bytes=device.total_bytes,
                    capacity_bytes=device.capacity_bytes,
                    used_bytes=self.budget.used(name),
                    shared_bytes=self.budget.shared(name),
                    claimed_bytes=self.budget.claimed(name),
                    observed_used_bytes=observed.used_bytes if observed else 0,
                    holders=holders,
                )
            )
        return reports


def _forget_footprint(name: str) -> None:
    with contextlib.suppress(KeyError):
        metrics.MODEL_FOOTPRINT_BYTES.remove(name)
