"""The loader's admission of a load into the budget, with the unloads it names. No Triton: the
unloads are the residency's, stood in for by a callable that frees the memory after a delay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from modelplane.common.types import Model, ModelSpec, ModelState, ModelStatus, Priority, Task
from modelplane.loader.budget import Holder
from modelplane.loader.errors import BudgetExceeded
from modelplane.loader.memory import MemoryManager
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import ModelRepository

MIB = 2**20


def model(name: str, footprint_mib: int, priority: Priority = Priority.NORMAL) -> Model:
    return Model(
        spec=ModelSpec(name=name, task=Task.EMBEDDING, source_uri="/x", priority=priority),
        status=ModelStatus(state=ModelState.STAGED, footprint_bytes=footprint_mib * MIB),
    )


@pytest.fixture
def memory(tmp_path: Path) -> MemoryManager:
    settings = LoaderSettings(host_memory_bytes=1000 * MIB, memory_safety_margin=0.0, memory_wait_seconds=2.0)
    manager = MemoryManager(settings, ModelRepository(tmp_path / "models"), processes=None, gpus=None)
    manager.budget.set_device("cpu", 1000 * MIB, 1000 * MIB)
    return manager


def resident(memory: MemoryManager, name: str, mib: int, used: float) -> None:
    memory.budget.hold(Holder(name, mib * MIB, Priority.NORMAL, ("cpu",), ModelState.READY, last_used=used))


async def admit(
    memory: MemoryManager, loading: Model, unload: Callable[[str, str, str], None], publish: Callable[[str], None]
) -> Holder:
    """Admission as the residency runs it: reserve, start the evictions it names, then admit."""
    reservation = await memory.reserve(loading, publish)
    for eviction in reservation.evictions:
        unload(eviction.name, eviction.reason, eviction.detail)
    return await memory.admit(reservation, loading, publish)


async def test_a_load_starts_only_once_the_evicted_memory_is_released(memory: MemoryManager) -> None:
    resident(memory, "old", 600, used=1.0)
    resident(memory, "recent", 300, used=2.0)
    released_at: list[float] = []
    evicted: list[tuple[str, str, str]] = []

    def unload(name: str, reason: str, detail: str) -> None:
        evicted.append((name, reason, detail))

        async def later() -> None:
            await asyncio.sleep(0.3)
            released_at.append(asyncio.get_running_loop().time())
            await memory.release(name)

        asyncio.get_running_loop().create_task(later())

    messages: list[str] = []
    holder = await admit(memory, model("new", 500), unload, messages.append)
    admitted_at = asyncio.get_running_loop().time()
    assert evicted == [("old", "eviction", "new")]
    assert released_at and admitted_at >= released_at[0]
    assert holder.state == ModelState.LOADING and holder.bytes == 500 * MIB
    assert any("unloading old" in m for m in messages)
    assert memory.budget.used("cpu") == 800 * MIB


async def test_a_load_whose_memory_is_never_freed_is_refused_after_the_wait(memory: MemoryManager) -> None:
    resident(memory, "stuck", 900, used=1.0)
    with pytest.raises(BudgetExceeded) as refused:
        await admit(memory, model("new", 500), lambda name, reason, detail: None, lambda _: None)  # never unloads
    assert refused.value.message.startswith("Waited 2 s for memory in vain.")
    assert "'stuck' (normal, 900 MiB, UNLOADING)" in refused.value.message
    assert not memory.budget.claims  # the claim is given back


async def test_concurrent_loads_evict_once_each_and_all_fit(memory: MemoryManager) -> None:
    for index in range(4):
        resident(memory, f"r{index}", 250, used=float(index))
    victims: list[str] = []

    def unload(name: str, reason: str, detail: str) -> None:
        victims.append(name)
        asyncio.get_running_loop().create_task(memory.release(name))

    holders = await asyncio.gather(*(admit(memory, model(f"n{i}", 250), unload, lambda _: None) for i in range(2)))
    assert sorted(victims) == ["r0", "r1"]  # the two least recently used, nothing more
    assert {h.name for h in holders} == {"n0", "n1"}
    assert memory.budget.used("cpu") == 1000 * MIB
