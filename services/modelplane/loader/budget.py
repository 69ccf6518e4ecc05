"""The memory budget: what holds memory on each device, and which models a load must evict.

Pure bookkeeping with no I/O, so every rule is tested directly; the loader's handler does the
loading, unloading and waiting. Two views of a device:

- **committed**: loading and loaded models, plus the claims of loads waiting for memory. Memory
  being unloaded is left out: it is already promised to the load that evicted it, so a second
  load does not evict more models for the same bytes (no chain of evictions).
- **physical**: loading, loaded *and unloading* models. A load starts only when its bytes fit
  here, i.e. once the memory it claimed is actually free.

Both views add the device's shared runtime (the backend's shared libraries, which every model
maps: see footprint.py) once while any model holds the device, and a load onto an empty device
brings it along.

Eviction order: never a pinned model, never a model of a higher class than the load; the lowest
class first (low, normal, high), the least recently used first within a class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from modelplane.common.types import ModelState, Priority
from modelplane.loader.errors import BudgetExceeded


@dataclass
class Holder:
    """A model holding memory on its devices (the same bytes on each)."""

    name: str
    bytes: int
    priority: Priority
    devices: tuple[str, ...]
    state: ModelState  # LOADING, READY or UNLOADING
    last_used: float
    measured: bool = False
    quota_bytes: int = 0
    idle_ttl_seconds: float = 0.0
    loaded_at: float = 0.0

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.priority.name.lower()}, {mib(self.bytes)}, {self.state.name})"


@dataclass
class Claim:
    """Bytes a load waiting for memory has reserved, and the models evicted to make them."""

    name: str
    bytes: int
    priority: Priority
    devices: tuple[str, ...]
    victims: list[str] = field(default_factory=list)


@dataclass
class Device:
    name: str
    total_bytes: int
    capacity_bytes: int
    shared_bytes: int = 0  # the runtime every model on the device shares, counted once


@dataclass(frozen=True)
class Plan:
    """What a load needs: the models to evict (possibly none), or why it must wait."""

    victims: list[Holder]
    # Not enough can be evicted now, but models of an evictable class are still loading or other
    # claims are waiting: the plan may work once they settle.
    must_wait: bool = False


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def effective(priority: Priority) -> Priority:
    return priority or Priority.NORMAL


def may_evict(load_priority: Priority, holder: Holder) -> bool:
    """A load may evict models of its own class or lower; pinned models never."""
    held = effective(holder.priority)
    return held != Priority.PINNED and held >= effective(load_priority)


def eviction_order(holder: Holder) -> tuple[int, float]:
    return (-int(effective(holder.priority)), holder.last_used)


class MemoryBudget:
    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.holders: dict[str, Holder] = {}
        self.claims: dict[str, Claim] = {}

    # Devices --------------------------------------------------------------------------------

    def set_device(self, name: str, total_bytes: int, capacity_bytes: int) -> None:
        shared = self.devices[name].shared_bytes if name in self.devices else 0
        self.devices[name] = Device(name, total_bytes, capacity_bytes, shared)

    def set_shared(self, device: str, nbytes: int) -> None:
        """The shared runtime's bytes on a device, as last measured."""
        if device in self.devices:
            self.devices[device].shared_bytes = nbytes

    def _on(self, device: str, items: Iterable[Holder | Claim]) -> list[Holder | Claim]:
        return [item for item in items if device in item.devices]

    def shared(self, device: str, *, adding: bool = False) -> int:
        """The shared runtime, counted while any model holds or claims the device, or when
        `adding` one."""
        occupied = adding or bool(self._on(device, [*self.holders.values(), *self.claims.values()]))
        return self.devices[device].shared_bytes if occupied else 0

    def used(self, device: str, *, adding: bool = False) -> int:
        """Physical view: every holder, unloading ones included, and the shared runtime."""
        holding = sum(h.bytes for h in self._on(device, self.holders.values()))
        return holding + self.shared(device, adding=adding)

    def committed(self, device: str, *, adding: bool = False) -> int:
        """Committed view: holders not being unloaded, plus waiting claims, and the shared runtime."""
        holding = sum(h.bytes for h in self._on(device, self.holders.values()) if h.state != ModelState.UNLOADING)
        claimed = sum(c.bytes for c in self._on(device, self.claims.values()))
        return holding + claimed + self.shared(device, adding=adding)

    def claimed(self, device: str) -> int:
        return sum(c.bytes for c in self._on(device, self.claims.values()))

    def free(self, device: str) -> int:
        return self.devices[device].capacity_bytes - self.used(device)

    def fits_physically(self, nbytes: int, devices: Sequence[str]) -> bool:
        return all(self.used(d, adding=True) + nbytes <= self.devices[d].capacity_bytes for d in devices)

    # Planning -------------------------------------------------------------------------------

    def plan(
        self,
        name: str,
        nbytes: int,
        priority: Priority,
        devices: Sequence[str],
        *,
        candidates: Callable[[list[Holder]], list[Holder]] | None = None,
    ) -> Plan:
        """The models to evict so that `nbytes` fit on every device in the committed view.

        `candidates` narrows and orders the evictable models (preloading uses it to displace only
        colder models); by default every model the load may evict, in eviction order. Raises
        BudgetExceeded, naming what holds the memory, when no eviction can make room."""
        for device in devices:
            capacity = self.devices[device].capacity_bytes
            if nbytes + self.devices[device].shared_bytes > capacity:
                total = self.devices[device].total_bytes
                raise BudgetExceeded(
                    f"Model '{name}' needs {mib(nbytes)} but the whole budget of device {device} is "
                    f"{mib(capacity)} ({mib(total)} less the safety margin). Raise the budget "
                    "(MODELPLANE_LOADER_HOST_MEMORY_BYTES or MODELPLANE_LOADER_GPU_MEMORY_BYTES) or set a smaller "
                    "memory_estimate_bytes if the estimate is wrong.",
                    metadata={"model": name, "needed_bytes": str(nbytes), "capacity_bytes": str(capacity)},
                )
        deficit = {d: self.committed(d, adding=True) + nbytes - self.devices[d].capacity_bytes for d in devices}
        if all(v <= 0 for v in deficit.values()):
            return Plan(victims=[])
        evictable = [
            h
            for h in self.holders.values()
            if h.name != name
            and h.state == ModelState.READY
            and may_evict(priority, h)
            and set(h.devices) & set(devices)
        ]
        ordered = candidates(evictable) if candidates else sorted(evictable, key=eviction_order)
        victims: list[Holder] = []
        for holder in ordered:
            if all(v <= 0 for v in deficit.values()):
                break
            if any(deficit.get(d, 0) > 0 for d in holder.devices):
                victims.append(holder)
                for d in holder.devices:
                    if d in deficit:
                        deficit[d] -= holder.bytes
        if all(v <= 0 for v in deficit.values()):
            return Plan(victims=victims)
        if candidates is None:
            loading = [
                h
                for h in self.holders.values()
                if h.name != name and h.state == ModelState.LOADING and may_evict(priority, h)
            ]
            if loading or any(c.name != name for c in self.claims.values()):
                return Plan(victims=[], must_wait=True)
        raise self.refusal(name, nbytes, priority, devices)

    def refusal(self, name: str, nbytes: int, priority: Priority, devices: Sequence[str]) -> BudgetExceeded:
        """The error for a load that cannot fit without evicting models it may not evict."""
        device = max(devices, key=lambda d: self.committed(d, adding=True) + nbytes - self.devices[d].capacity_bytes)
        capacity = self.devices[device].capacity_bytes
        free = max(0, capacity - self.committed(device))
        holders = sorted(self._on(device, self.holders.values()), key=lambda h: (int(effective(h.priority)), -h.bytes))
        named = ", ".join(h.label for h in holders) or "nothing else"
        waiting = [c for c in self._on(device, self.claims.values()) if c.name != name]
        if waiting:
            claims = ", ".join(f"'{c.name}' ({mib(c.bytes)})" for c in waiting)
            named += f"; claimed by loads waiting for memory: {claims}"
        return BudgetExceeded(
            f"Model '{name}' ({effective(priority).name.lower()}) needs {mib(nbytes)} on {device}, where "
            f"{mib(free)} of the {mib(capacity)} budget is free; it may evict only models of its own priority "
            f"or lower, and the memory is held by {named}. Unload one of them, lower its priority, raise this "
            "model's priority, or raise the memory budget.",
            metadata={"model": name, "device": device, "needed_bytes": str(nbytes), "free_bytes": str(free)},
            retry_after_seconds=10.0,
        )

    # Changes --------------------------------------------------------------------------------

    def claim(self, claim: Claim) -> None:
        self.claims[claim.name] = claim

    def drop_claim(self, name: str) -> Claim | None:
        return self.claims.pop(name, None)

    def hold(self, holder: Holder) -> None:
        self.holders[holder.name] = holder

    def release(self, name: str) -> Holder | None:
        return self.holders.pop(name, None)

    def least_recently_used(self) -> list[Holder]:
        return sorted(self.holders.values(), key=lambda h: h.last_used)
