"""The budget's rules, directly: which models a load evicts, and when it must wait or is refused."""

from __future__ import annotations

import pytest

from modelplane.common.types import ModelState, Priority
from modelplane.loader.budget import Claim, Holder, MemoryBudget
from modelplane.loader.errors import BudgetExceeded

MIB = 2**20


def holder(name: str, mib: int, priority: Priority = Priority.NORMAL, *, used: float = 0.0, state=ModelState.READY):
    return Holder(name, mib * MIB, priority, ("cpu",), state, last_used=used)


@pytest.fixture
def budget() -> MemoryBudget:
    b = MemoryBudget()
    b.set_device("cpu", 1100 * MIB, 1000 * MIB)
    return b


def test_fits_without_eviction(budget: MemoryBudget) -> None:
    budget.hold(holder("a", 400))
    assert budget.plan("b", 500 * MIB, Priority.NORMAL, ["cpu"]).victims == []


def test_evicts_lowest_class_first_then_least_recently_used(budget: MemoryBudget) -> None:
    budget.hold(holder("normal-old", 300, used=1.0))
    budget.hold(holder("low-recent", 300, Priority.LOW, used=9.0))
    budget.hold(holder("normal-recent", 300, used=5.0))
    plan = budget.plan("new", 300 * MIB, Priority.NORMAL, ["cpu"])
    assert [v.name for v in plan.victims] == ["low-recent"]
    plan = budget.plan("new", 500 * MIB, Priority.NORMAL, ["cpu"])
    assert [v.name for v in plan.victims] == ["low-recent", "normal-old"]


def test_refuses_rather_than_evict_a_higher_class_and_names_the_holders(budget: MemoryBudget) -> None:
    budget.hold(holder("keeper", 500, Priority.HIGH))
    budget.hold(holder("anchor", 400, Priority.PINNED))
    with pytest.raises(BudgetExceeded) as refused:
        budget.plan("new", 300 * MIB, Priority.NORMAL, ["cpu"])
    message = refused.value.message
    assert "'anchor' (pinned, 400 MiB, READY)" in message
    assert "'keeper' (high, 500 MiB, READY)" in message
    assert "needs 300 MiB on cpu, where 100 MiB of the 1000 MiB budget is free" in message
    assert refused.value.reason == "BUDGET_EXCEEDED"
    # A pinned load may evict the high-priority model, never the pinned one.
    assert [v.name for v in budget.plan("vip", 300 * MIB, Priority.PINNED, ["cpu"]).victims] == ["keeper"]


def test_a_model_larger_than_the_device_is_refused_with_the_setting_to_change(budget: MemoryBudget) -> None:
    with pytest.raises(BudgetExceeded, match="MODELPLANE_LOADER_HOST_MEMORY_BYTES"):
        budget.plan("huge", 2000 * MIB, Priority.PINNED, ["cpu"])


def test_memory_being_unloaded_is_not_evicted_for_twice(budget: MemoryBudget) -> None:
    budget.hold(holder("a", 500, used=1.0))
    budget.hold(holder("b", 500, used=2.0))
    first = budget.plan("x", 400 * MIB, Priority.NORMAL, ["cpu"])
    assert [v.name for v in first.victims] == ["a"]
    first.victims[0].state = ModelState.UNLOADING
    budget.claim(Claim("x", 400 * MIB, Priority.NORMAL, ("cpu",), ["a"]))
    # a's 500 MiB are promised to x's 400: y's 100 fit in what is left, with no second eviction.
    assert budget.plan("y", 100 * MIB, Priority.NORMAL, ["cpu"]).victims == []
    # But x may not start until a's memory is actually free.
    assert not budget.fits_physically(400 * MIB, ["cpu"])
    budget.release("a")
    assert budget.fits_physically(400 * MIB, ["cpu"])


def test_waits_when_only_loading_models_could_make_room(budget: MemoryBudget) -> None:
    budget.hold(holder("loading", 800, state=ModelState.LOADING))
    plan = budget.plan("next", 400 * MIB, Priority.NORMAL, ["cpu"])
    assert plan.must_wait and plan.victims == []


def test_gpu_models_need_room_on_every_gpu_they_occupy() -> None:
    b = MemoryBudget()
    for gpu in ("gpu:0", "gpu:1"):
        b.set_device(gpu, 16 * 1024 * MIB, 14 * 1024 * MIB)
    b.hold(Holder("big", 10 * 1024 * MIB, Priority.NORMAL, ("gpu:0", "gpu:1"), ModelState.READY, last_used=0))
    plan = b.plan("other", 6 * 1024 * MIB, Priority.NORMAL, ["gpu:0", "gpu:1"])
    assert [v.name for v in plan.victims] == ["big"]


def test_the_shared_runtime_is_counted_once_and_only_while_a_model_holds_the_device(budget: MemoryBudget) -> None:
    budget.set_shared("cpu", 200 * MIB)
    assert budget.used("cpu") == 0  # nothing loaded: the runtime's pages are not held
    # A first model brings the runtime along: 700 + 200 of 1000 fit, 900 + 200 do not.
    assert budget.fits_physically(700 * MIB, ["cpu"])
    assert not budget.fits_physically(900 * MIB, ["cpu"])
    budget.hold(holder("a", 300, used=1.0))
    budget.hold(holder("b", 300, used=2.0))
    assert budget.used("cpu") == budget.committed("cpu") == 800 * MIB  # 300 + 300 + 200 once
    # A third of 300 needs only its own bytes (deficit 100): one eviction, not two.
    assert [v.name for v in budget.plan("c", 300 * MIB, Priority.NORMAL, ["cpu"]).victims] == ["a"]
    budget.set_device("cpu", 1100 * MIB, 1000 * MIB)  # devices refreshed: the measurement stays
    assert budget.shared("cpu") == 200 * MIB


def test_a_model_that_fits_only_without_the_shared_runtime_is_refused(budget: MemoryBudget) -> None:
    budget.set_shared("cpu", 200 * MIB)
    with pytest.raises(BudgetExceeded, match="needs 900 MiB but the whole budget"):
        budget.plan("big", 900 * MIB, Priority.NORMAL, ["cpu"])
