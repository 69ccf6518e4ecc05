"""Predictive preloading: which model to load before anyone asks for it.

Each model's request rate over the next horizon is forecast from the registry's statistics:

- *recent*: a blend of its 1-minute, 5-minute and 1-hour exponentially weighted rates, which
  follows bursts and shifts in popularity, and at least a rate implied by how recently it was
  used, which keeps a model that is in the middle of a session;
- *seasonal*: the model's share of all requests seen in the coming hour of the day (the
  time-of-day profile) times today's overall rate, which anticipates the daily pattern before
  the requests arrive. Its weight grows with how many requests that hour has seen.

The hottest model not loaded is preloaded when it is expected to be requested at all within the
horizon and it fits in free memory, or after displacing loaded models that are all clearly colder
than it (never a hotter one, never one used in the last seconds, never against the budget's
priority rules).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from modelplane.common.types import Priority
from modelplane.loader.budget import BudgetExceeded, Holder, MemoryBudget
from modelplane.registry.statistics import ModelStatistics

# Weights of the 1-minute, 5-minute and 1-hour rates in the recent rate.
RECENT_WEIGHTS = {"rate_1m": 0.5, "rate_5m": 0.3, "rate_1h": 0.2}
# Weight of the recency term. On the benchmark's traces, 1.0 protects long sessions best and costs
# most on independent requests; 0.5 is within a few points of the best of both (benchmarks/).
RECENCY_WEIGHT = 0.5
# Requests an hour of the day must have seen (over all models) for its profile to count half.
SEASONAL_CONFIDENCE_REQUESTS = 200.0


def forecast(statistics: Mapping[str, ModelStatistics], now: datetime, horizon_seconds: float) -> dict[str, float]:
    """Expected requests per second of each model over the next `horizon_seconds`."""
    recent = {
        name: max(sum(getattr(s, field) * weight for field, weight in RECENT_WEIGHTS.items()), _recency(s, now))
        for name, s in statistics.items()
    }
    hour = (now + timedelta(seconds=horizon_seconds / 2)).hour
    seen = sum(s.hour_of_day_counts[hour] for s in statistics.values())
    if not seen:
        return recent
    overall = sum(recent.values())
    weight = 0.5 * seen / (seen + SEASONAL_CONFIDENCE_REQUESTS)
    return {
        name: (1 - weight) * recent[name] + weight * overall * s.hour_of_day_counts[hour] / seen
        for name, s in statistics.items()
    }


def _recency(stats: ModelStatistics, now: datetime) -> float:
    """Requests come in sessions (a chat, an indexing batch): a model used t seconds ago is likely
    used again soon, which the smoothed rates understate mid-session. Counted as a rate of
    RECENCY_WEIGHT / t, so a model in use is not displaced, and one used once is soon forgotten."""
    if stats.last_request_time is None:
        return 0.0
    return RECENCY_WEIGHT / max(1.0, (now - stats.last_request_time).total_seconds())


@dataclass(frozen=True)
class Candidate:
    """A model that is not loaded and could be preloaded."""

    name: str
    bytes: int
    priority: Priority
    devices: tuple[str, ...]
    idle_ttl_seconds: float = 0.0


@dataclass(frozen=True)
class Preload:
    candidate: Candidate
    rate: float
    victims: list[Holder]


@dataclass(frozen=True)
class PreloadPolicy:
    horizon_seconds: float
    min_expected_requests: float
    hysteresis: float
    # A model used or loaded this recently is never displaced by a preload: when popularity is
    # too noisy to forecast, preloads would otherwise swap models back and forth.
    protect_seconds: float = 5.0

    def choose(
        self, rates: Mapping[str, float], candidates: list[Candidate], budget: MemoryBudget, now: float
    ) -> Preload | None:
        """The preload worth doing now, with the models it displaces, or None."""
        for candidate in sorted(candidates, key=lambda c: rates.get(c.name, 0.0), reverse=True):
            rate = rates.get(candidate.name, 0.0)
            window = self.horizon_seconds
            if candidate.idle_ttl_seconds:
                # Preloading what its idle TTL would unload before the first request is waste.
                window = min(window, candidate.idle_ttl_seconds)
            if rate * window < self.min_expected_requests:
                return None  # the rest are colder still
            try:
                plan = budget.plan(
                    candidate.name,
                    candidate.bytes,
                    candidate.priority,
                    candidate.devices,
                    candidates=self._colder_than(rate, rates, now),
                )
            except BudgetExceeded:
                continue  # a smaller, slightly colder model may still fit
            return Preload(candidate, rate, plan.victims)
        return None

    def _colder_than(
        self, rate: float, rates: Mapping[str, float], now: float
    ) -> Callable[[list[Holder]], list[Holder]]:
        def pick(evictable: list[Holder]) -> list[Holder]:
            colder = [
                h
                for h in evictable
                if rates.get(h.name, 0.0) * (1 + self.hysteresis) < rate and now - h.last_used >= self.protect_seconds
            ]
            return sorted(colder, key=lambda h: (rates.get(h.name, 0.0), h.last_used))

        return pick
