"""Limits a request lives within: its caller's request rate, its deadline, its batch size and,
for generation, its `max_tokens`.

The rate and the deadline are applied to every API request by the access middleware. Routes use
the rest through `limits(request)`:

    limit = limits(request)
    limit.check_batch(len(texts), "input")            # 400 past MODELPLANE_GATEWAY_MAX_BATCH_INPUTS
    max_tokens = limit.clamp_max_tokens(body.max_tokens)  # lowered to MODELPLANE_GATEWAY_MAX_TOKENS_LIMIT
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from fastapi import Request

from modelplane.gateway.errors import BadRequest
from modelplane.gateway.settings import GatewaySettings

# time.monotonic() past which the request being handled is abandoned; set by the access middleware.
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


def remaining_seconds() -> float | None:
    """Time left to the current request's deadline; None outside a request."""
    deadline = request_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


class RateLimiter:
    """One token bucket per caller: `per_minute` requests a minute, in bursts of up to a minute's
    worth. In memory, per gateway process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller → (tokens, when counted)

    def acquire(self, caller: str, per_minute: int) -> float | None:
        """Takes one request from the caller's bucket: None when allowed, else the seconds until
        the next request will be."""
        if per_minute <= 0:
            return None
        now = self._clock()
        tokens, then = self._buckets.get(caller, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - then) * per_minute / 60.0)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            return None
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) * 60.0 / per_minute


@dataclass(frozen=True)
class Limits:
    max_batch_inputs: int
    max_tokens_limit: int
    inference_batch_inputs: int
    inference_concurrency: int

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Limits:
        return cls(
            max_batch_inputs=settings.max_batch_inputs,
            max_tokens_limit=settings.max_tokens_limit,
            inference_batch_inputs=max(1, settings.inference_batch_inputs),
            inference_concurrency=max(1, settings.inference_concurrency),
        )

    def check_batch(self, count: int, param: str) -> None:
        if count > self.max_batch_inputs:
            raise BadRequest(
                f"'{param}' has {count} items; this gateway accepts at most {self.max_batch_inputs} per request "
                "(MODELPLANE_GATEWAY_MAX_BATCH_INPUTS). Split it into several requests.",
                code="too_many_inputs",
                param=param,
            )

    def clamp_max_tokens(self, requested: int | None) -> int:
        """The `max_tokens` to ask the inference service for: the request's, lowered to the
        gateway's limit; absent means the limit (the service lowers it to what fits the context)."""
        if requested is None or requested > self.max_tokens_limit:
            return self.max_tokens_limit
        return requested


def limits(request: Request) -> Limits:
    """The limits of the application serving this request."""
    return request.app.state.limits
