"""How every workload measures: closed-loop clients for a fixed window, medians and percentiles,
ratios taken within a round (the machine is shared, so only same-run comparisons mean much)."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def ratio_per_round(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """a/b for each round where both were measured: pairs share the round's noise."""
    return [a / b for a, b in zip(numerators, denominators, strict=False) if b and not math.isnan(a / b)]


@dataclass
class Point:
    """One contender under one load for one window."""

    texts_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


async def closed_loop(
    call: Callable[[list[str]], Awaitable[object]],
    requests: Sequence[list[str]],
    clients: int,
    seconds: float,
    warmup_seconds: float,
    min_requests: int = 10,
) -> Point:
    """`clients` callers, each sending its next request when the last is answered (as an indexing
    job does). After `warmup_seconds` the window opens; it closes after `seconds` once at least
    `min_requests` were answered in it (so a slow contender still gets a median worth the name),
    and at the latest after 4 x `seconds`. Only requests sent and answered inside it count."""
    latencies: list[float] = []
    texts = 0
    start = time.perf_counter() + warmup_seconds
    end = start + 4 * seconds

    async def client(offset: int) -> None:
        nonlocal texts, end
        i = offset
        while (sent := time.perf_counter()) < end:
            body = requests[i % len(requests)]
            i += clients
            await call(body)
            answered = time.perf_counter()
            if sent >= start and answered <= end:
                latencies.append(answered - sent)
                texts += len(body)
                if answered >= start + seconds and len(latencies) >= min_requests:
                    end = min(end, answered)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return Point(
        texts_per_second=texts / (end - start),
        p50_ms=1000 * percentile(latencies, 50),
        p99_ms=1000 * percentile(latencies, 99),
        requests=len(latencies),
    )


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_ratio(values: Sequence[float]) -> str:
    """The median ratio with each round's value, e.g. `0.82× (0.80, 0.85)`."""
    if not values:
        return "n/a"
    rounds = f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
    return f"{median(values):.2f}×{rounds}"
