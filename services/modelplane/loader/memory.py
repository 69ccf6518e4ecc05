"""The loader's memory: each device's budget, admission of a load into it, and measurement.

Admission plans what a load must evict and claims its bytes (`reserve`), then waits until that
memory is actually free and holds it for the load (`admit`). The evictions it plans are returned,
not carried out: the node's residency runs every unload. Measurement reads what loaded models
really hold and how recently they were used. What to unload or preload over time is decided by the
periodic budget work in maintenance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from modelplane.common.types import Model, ModelState, Priority, RuntimeTarget
from modelplane.common.waiting import wait_set
from modelplane.loader import metrics
from modelplane.loader.budget import Claim, Holder, MemoryBudget, effective, mib
from modelplane.loader.decisions import Unload
from modelplane.loader.devices import HOST, DeviceMemory, GpuMemoryReader, host_memory
from modelplane.loader.errors import BudgetExceeded, QuotaExceeded
from modelplane.loader.footprint import BackendProcesses, estimate_footprint
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import ModelRepository
from modelplane.registry.statistics import ModelStatistics

log = structlog.get_logger()

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


@dataclass(frozen=True)
class Reservation:
    """A load's bytes claimed in the budget, with the unloads that must free them."""

    name: str
    bytes: int
    measured: bool
    devices: tuple[str, ...]
    priority: Priority
    deadline: float  # event-loop time after which the wait for memory gives up
    victims: tuple[str, ...] = ()  # the models unloaded to free the bytes
    evictions: list[Unload] = field(default_factory=list)  # those of them this reservation must start


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
        self.waiting = 0
        self._runtime_measured = False  # the shared runtime's bytes, measured once a stub runs

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

    def idle_ttl(self, model: Model) -> float:
        """Seconds without a request after which the model is unloaded; 0 means never."""
        if effective(model.spec.priority) == Priority.PINNED:
            return 0.0
        ttl = model.spec.idle_ttl
        return ttl.total_seconds() if ttl is not None else self.settings.idle_ttl_seconds

    def _observed_room(self, nbytes: int, devices: Sequence[str]) -> bool:
        """Whether each device itself reports the bytes free, beyond what the budget believes:
        memory used outside modelplane is memory a load cannot have."""
        if HOST in devices:
            self.observed[HOST] = host_memory()
        return all(d not in self.observed or self.observed[d].free_bytes >= nbytes for d in devices)

    # Admission ------------------------------------------------------------------------------

    async def reserve(self, model: Model, publish: Publish) -> Reservation:
        """Claims the model's bytes, naming the models to evict for them (the caller starts those
        unloads); waits while loads in flight may still change the picture. Raises BudgetExceeded
        when no eviction the policy allows can make room. A claim the model already has (a
        preload's) is taken over as it is."""
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
                while (claim := self.budget.claims.get(name)) is None:
                    plan = self.budget.plan(name, nbytes, priority, devices)
                    if not plan.must_wait:
                        claim = Claim(name, nbytes, priority, devices, [v.name for v in plan.victims])
                        self.budget.claim(claim)
                        evictions = self.evict(plan.victims, name, "load")
                        return Reservation(
                            name, nbytes, measured, devices, priority, deadline, tuple(claim.victims), evictions
                        )
                    publish(f"waiting for {mib(nbytes)}: other loads hold the memory it needs")
                    await self._wait(deadline, name, nbytes, priority, devices)
                return Reservation(name, claim.bytes, measured, devices, priority, deadline, tuple(claim.victims))
        except BaseException:
            await self.drop_claim(name)
            raise
        finally:
            self.note_waiting(-1)

    async def wait_for_room(self, reservation: Reservation, publish: Publish) -> None:
        """Returns once the reserved bytes are actually free on every device (the evicted models'
        processes have exited, and nothing outside modelplane holds the memory); raises
        BudgetExceeded, giving the claim back, when they are not free in time."""
        name, nbytes, devices = reservation.name, reservation.bytes, reservation.devices
        self.note_waiting(+1)
        try:
            async with self.changed:
                while not (self.budget.fits_physically(nbytes, devices) and self._observed_room(nbytes, devices)):
                    if reservation.victims:
                        victims = ", ".join(reservation.victims)
                        publish(f"waiting for {mib(nbytes)} to be freed: unloading {victims}")
                    await self._wait(reservation.deadline, name, nbytes, reservation.priority, devices)
        except BaseException:
            await self.drop_claim(name)
            raise
        finally:
            self.note_waiting(-1)

    async def admit(self, reservation: Reservation, model: Model, publish: Publish) -> Holder:
        """Waits for the reserved memory, then holds it for the model's load (LOADING)."""
        await self.wait_for_room(reservation, publish)
        async with self.changed:
            self.budget.drop_claim(reservation.name)
            holder = self._holder(model, reservation.bytes, reservation.measured, reservation.devices)
            self.budget.hold(holder)
        self.publish_metrics()
        return holder

    def _holder(
        self,
        model: Model,
        nbytes: int,
        measured: bool,
        devices: tuple[str, ...],
        state: ModelState = ModelState.LOADING,
    ) -> Holder:
        now = self.clock()
        return Holder(
            name=model.name,
            bytes=nbytes,
            priority=effective(model.spec.priority),
            devices=devices,
            state=state,
            last_used=self.last_request(model.name) or now,
            measured=measured,
            quota_bytes=model.spec.memory_quota_bytes,
            idle_ttl_seconds=self.idle_ttl(model),
            loaded_at=now,
        )

    async def _wait(self, deadline: float, name: str, nbytes: int, priority: Priority, devices: Sequence[str]) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self._timed_out(name, nbytes, priority, devices)
        # Woken by every change of the budget; re-checked regularly for memory freed outside it.
        await wait_set(self.changed, min(remaining, _RECHECK_SECONDS))

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

    def evict(self, victims: Sequence[Holder], for_model: str, why: str) -> list[Unload]:
        """Marks the victims UNLOADING now, so no other plan counts on their memory, and returns
        the unloads that free it (`why`: what the room is for: a load, a preload, the budget)."""
        now = self.clock()
        evictions = []
        for victim in victims:
            victim.state = ModelState.UNLOADING
            metrics.EVICTIONS.labels(why).inc()
            metrics.EVICTION_AGE.observe(max(0.0, now - victim.last_used))
            log.info("evicting", model=victim.name, for_model=for_model, why=why, idle_seconds=now - victim.last_used)
            evictions.append(Unload(victim.name, "eviction", for_model))
        return evictions

    def claim(self, claim: Claim) -> None:
        """Reserves bytes for a load that is yet to start (a preload); its admission takes the claim over."""
        self.budget.claim(claim)

    async def drop_claim(self, name: str) -> None:
        async with self.changed:
            if self.budget.drop_claim(name):
                self.changed.notify_all()

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
        if (over := self.over_quota(holder)) is not None:
            raise over
        return measured

    async def remeasure(self) -> list[Holder]:
        """Measures every loaded model again; returns those measured now."""
        if self.processes is None:
            return []
        resident = await self.processes.measure()
        self._note_shared(resident.shared_bytes)
        measured = []
        for holder in [h for h in self.budget.holders.values() if h.state == ModelState.READY]:
            nbytes = resident.own.get(holder.name)
            if nbytes is None:
                continue
            holder.bytes, holder.measured = nbytes, True
            metrics.MODEL_FOOTPRINT_BYTES.labels(holder.name).set(nbytes)
            measured.append(holder)
        return measured

    def _note_shared(self, nbytes: int) -> None:
        """The backend runtime's shared pages on the host: the first measurement replaces the
        estimate; then they stay counted (once) at their largest, since models touch different
        pages of the libraries and a load onto an emptied device brings them back."""
        if HOST in self.budget.devices and nbytes:
            known = self.budget.devices[HOST].shared_bytes if self._runtime_measured else 0
            self.budget.set_shared(HOST, max(nbytes, known))
            self._runtime_measured = True

    def over_quota(self, holder: Holder) -> QuotaExceeded | None:
        """The refusal of a model that holds more than its memory quota, or None."""
        if not holder.quota_bytes or holder.bytes <= holder.quota_bytes:
            return None
        return QuotaExceeded(
            f"Model '{holder.name}' holds {mib(holder.bytes)} ({holder.bytes} bytes) once loaded, over its memory "
            f"quota of {mib(holder.quota_bytes)} ({holder.quota_bytes} bytes); it was unloaded. Raise its "
            "memory_quota_bytes if that much is expected, or serve a smaller model.",
            metadata={
                "model": holder.name,
                "measured_bytes": str(holder.bytes),
                "quota_bytes": str(holder.quota_bytes),
            },
        )

    def note_usage(self, statistics: Sequence[ModelStatistics]) -> None:
        """Takes in the registry's request statistics: each loaded model's last use."""
        self.statistics = {s.model_name: s for s in statistics}
        for holder in self.budget.holders.values():
            last = self.last_request(holder.name)
            if last:
                holder.last_used = max(holder.last_used, last)

    def last_request(self, name: str) -> float | None:
        stats = self.statistics.get(name)
        return stats.last_request_time.timestamp() if stats and stats.last_request_time else None

    # Holding --------------------------------------------------------------------------------

    async def loaded(self, holder: Holder) -> None:
        async with self.changed:
            holder.state = ModelState.READY
            holder.last_used = max(holder.last_used, self.clock())
            self.changed.notify_all()
        metrics.MODEL_FOOTPRINT_BYTES.labels(holder.name).set(holder.bytes)
        self.publish_metrics()

    def unloading(self, name: str) -> None:
        """The model's unload has begun: its memory is promised elsewhere, but held until released."""
        holder = self.budget.holders.get(name)
        if holder is not None:
            holder.state = ModelState.UNLOADING

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
            holder.idle_ttl_seconds = self.idle_ttl(model)

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
