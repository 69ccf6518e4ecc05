"""Request rates, batch limits and the max_tokens clamp."""

from __future__ import annotations

import pytest

from modelplane.gateway.errors import BadRequest
from modelplane.gateway.limits import Limits, RateLimiter
from modelplane.gateway.settings import GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_minute_of_requests_then_the_wait_for_the_next() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.acquire("dify", 3) for _ in range(3)] == [None, None, None]
    assert limiter.acquire("dify", 3) == pytest.approx(20.0)
    clock.now += 10
    assert limiter.acquire("dify", 3) == pytest.approx(10.0)
    clock.now += 10
    assert limiter.acquire("dify", 3) is None
    # Another caller has its own bucket, and 0 means no limit.
    assert limiter.acquire("ops", 3) is None
    assert all(limiter.acquire("free", 0) is None for _ in range(100))


def test_batch_limit_names_the_field_and_the_setting() -> None:
    limit = Limits.from_settings(GatewaySettings(max_batch_inputs=4))
    limit.check_batch(4, "input")
    with pytest.raises(BadRequest) as refused:
        limit.check_batch(5, "input")
    assert refused.value.code == "too_many_inputs" and refused.value.param == "input"
    assert "'input' has 5 items; this gateway accepts at most 4" in refused.value.message
    assert "MODELPLANE_GATEWAY_MAX_BATCH_INPUTS" in refused.value.message


def test_max_tokens_is_lowered_to_the_limit() -> None:
    limit = Limits.from_settings(GatewaySettings(max_tokens_limit=512))
    assert limit.clamp_max_tokens(5) == 5
    assert limit.clamp_max_tokens(100_000) == 512
    assert limit.clamp_max_tokens(None) == 512
