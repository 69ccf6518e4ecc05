"""Request statistics per model: the arithmetic, apart from where it is stored.

The inference service reports request counts in batches; each batch decays the exponentially
weighted rates by the time passed and adds its count, and lands in its UTC hour of the day. The
store keeps the result in a row per model; the loader's preloading benchmark replays a trace
through this same arithmetic on a virtual clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pydantic import Field

from modelplane.common.types import Record

# Column (and protobuf field) name → time constant in seconds.
RATE_TIME_CONSTANTS = {"rate_1m": 60.0, "rate_5m": 300.0, "rate_1h": 3600.0}


class ModelStatistics(Record):
    """Request statistics of one model, as the registry reports them (rates decayed to now)."""

    model_name: str
    total_requests: int = 0
    cold_starts: int = 0
    rate_1m: float = 0.0
    rate_5m: float = 0.0
    rate_1h: float = 0.0
    hour_of_day_counts: list[int] = Field(default_factory=lambda: [0] * 24)
    last_request_time: datetime | None = None


@dataclass(frozen=True)
class StatisticsState:
    """What is stored per model: rates as of `rates_time` (seconds since the epoch)."""

    total_requests: int = 0
    cold_starts: int = 0
    rates: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RATE_TIME_CONSTANTS, 0.0))
    rates_time: float = 0.0
    hour_of_day_counts: tuple[int, ...] = (0,) * 24
    last_request_time: datetime | None = None

    def record(self, count: int, cold_starts: int, last_request: datetime, now: float) -> StatisticsState:
        """The state after a batch of `count` requests reported at `now`."""
        elapsed = max(0.0, now - self.rates_time) if self.rates_time else 0.0
        rates = {
            # An event adds 1/tau to the rate, which then decays with time constant tau.
            name: self.rates.get(name, 0.0) * math.exp(-elapsed / tau) + count / tau
            for name, tau in RATE_TIME_CONSTANTS.items()
        }
        hours = list(self.hour_of_day_counts)
        hours[last_request.astimezone(UTC).hour] += count
        last = max(last_request, self.last_request_time) if self.last_request_time else last_request
        return replace(
            self,
            total_requests=self.total_requests + count,
            cold_starts=self.cold_starts + cold_starts,
            rates=rates,
            rates_time=now,
            hour_of_day_counts=tuple(hours),
            last_request_time=last,
        )

    def snapshot(self, model_name: str, now: float) -> ModelStatistics:
        """The statistics as of `now`: rates decayed by the time since the last batch."""
        elapsed = max(0.0, now - self.rates_time) if self.rates_time else 0.0
        decayed = {
            name: self.rates.get(name, 0.0) * math.exp(-elapsed / tau) for name, tau in RATE_TIME_CONSTANTS.items()
        }
        return ModelStatistics(
            model_name=model_name,
            total_requests=self.total_requests,
            cold_starts=self.cold_starts,
            hour_of_day_counts=list(self.hour_of_day_counts),
            last_request_time=self.last_request_time,
            **decayed,
        )
