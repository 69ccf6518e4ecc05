"""Backoff between attempts at a remote request: exponential, with full jitter, capped."""

from __future__ import annotations

import random

MAX_DELAY_SECONDS = 30.0


def backoff_delay(attempt: int, base_seconds: float) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1). Full jitter keeps many
    loaders that failed together from retrying together."""
    ceiling = min(MAX_DELAY_SECONDS, base_seconds * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
