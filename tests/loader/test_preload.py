"""Forecasting from request statistics and choosing what to preload, on the registry's own
statistics arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modelplane.common.types import ModelState, Priority
from modelplane.loader.budget import Holder, MemoryBudget
from modelplane.loader.preload import Candidate, PreloadPolicy, forecast
from modelplane.registry.statistics import StatisticsState

MIB = 2**20
NOON = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)


def stats_after(requests_per_minute: float, minutes: int, end: datetime, name: str):
    state = StatisticsState()
    for minute in range(minutes):
        at = end - timedelta(minutes=minutes - minute)
        state = state.record(int(requests_per_minute), 0, at, at.timestamp())
    return state.snapshot(name, end.timestamp())


def test_recent_rates_rank_a_rising_model_above_a_fading_one() -> None:
    rising = stats_after(30, 3, NOON, "rising")
    state = StatisticsState()
    for minute in range(60):
        at = NOON - timedelta(minutes=90 - minute)
        state = state.record(30, 0, at, at.timestamp())
    fading = state.snapshot("fading", NOON.timestamp())
    rates = forecast({"rising": rising, "fading": fading}, NOON, 300)
    assert rates["rising"] > rates["fading"]


def test_the_time_of_day_profile_anticipates_the_next_hour() -> None:
    # Yesterday "morning" served 12:00-13:00 and "night" served 11:00-12:00; now it is 11:58.
    now = NOON - timedelta(minutes=2)
    morning, night = StatisticsState(), StatisticsState()
    for minute in range(60):
        yesterday_noon = NOON - timedelta(days=1) + timedelta(minutes=minute)
        morning = morning.record(20, 0, yesterday_noon, yesterday_noon.timestamp())
        today_eleven = NOON - timedelta(hours=1) + timedelta(minutes=minute - 2)
        night = night.record(20, 0, today_eleven, today_eleven.timestamp())
    statistics = {
        "morning": morning.snapshot("morning", now.timestamp()),
        "night": night.snapshot("night", now.timestamp()),
    }
    rates = forecast(statistics, now, horizon_seconds=600)
    assert rates["morning"] > 0.5 * rates["night"]
    assert forecast(statistics, now, horizon_seconds=0)["morning"] < rates["morning"]


def budget_with(*holders: Holder) -> MemoryBudget:
    budget = MemoryBudget()
    budget.set_device("cpu", 350 * MIB, 300 * MIB)
    for h in holders:
        budget.hold(h)
    return budget


def ready(name: str, priority: Priority = Priority.NORMAL) -> Holder:
    return Holder(name, 100 * MIB, priority, ("cpu",), ModelState.READY, last_used=0.0)


def candidate(name: str, priority: Priority = Priority.NORMAL) -> Candidate:
    return Candidate(name, 100 * MIB, priority, ("cpu",))


POLICY = PreloadPolicy(horizon_seconds=300, min_expected_requests=1.0, hysteresis=0.5, protect_seconds=15)
LATER = 1000.0  # seconds after every model's last use


def test_a_model_in_use_is_not_displaced() -> None:
    budget = budget_with(ready("a"), ready("b"), ready("c"))
    rates = {"a": 0.05, "b": 0.08, "c": 0.01, "new": 0.06}
    assert POLICY.choose(rates, [candidate("new")], budget, now=10.0) is None  # c was used 10 s ago
    choice = POLICY.choose(rates, [candidate("new")], budget, now=15.0)
    assert choice is not None and [v.name for v in choice.victims] == ["c"]


def test_preloads_into_free_memory_without_evicting() -> None:
    choice = POLICY.choose({"hot": 0.1}, [candidate("hot")], budget_with(ready("a")), LATER)
    assert choice is not None and choice.candidate.name == "hot" and choice.victims == []


def test_never_displaces_a_model_that_is_hotter_or_about_as_hot() -> None:
    budget = budget_with(ready("a"), ready("b"), ready("c"))
    rates = {"a": 0.05, "b": 0.08, "c": 0.01, "new": 0.06}
    choice = POLICY.choose(rates, [candidate("new")], budget, LATER)
    assert choice is not None and [v.name for v in choice.victims] == ["c"]
    # Only c is colder than new by the hysteresis margin; needing two victims, nothing happens.
    big = Candidate("new", 200 * MIB, Priority.NORMAL, ("cpu",))
    assert POLICY.choose(rates, [big], budget, LATER) is None


def test_no_preload_for_a_model_not_expected_within_the_horizon() -> None:
    assert POLICY.choose({"rare": 1 / 3600}, [candidate("rare")], budget_with(), LATER) is None


def test_a_preload_respects_priority_classes() -> None:
    budget = budget_with(ready("a", Priority.HIGH), ready("b", Priority.HIGH), ready("c", Priority.HIGH))
    assert POLICY.choose({"new": 1.0}, [candidate("new")], budget, LATER) is None
