"""Request counts per model, sent to the registry in the background (they drive idle expiry and
predictive preloading). Losing a report costs a little accuracy, never a request."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from datetime import UTC, datetime

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import RequestCount
from modelplane.registry.client import RegistryClient

log = structlog.get_logger()


class RequestStatistics:
    def __init__(self, registry: RegistryClient, interval_seconds: float) -> None:
        self.registry = registry
        self.interval = interval_seconds
        self._counts: dict[str, int] = defaultdict(int)
        self._cold: dict[str, int] = defaultdict(int)
        self._last: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, model: str, *, cold_start: bool = False) -> None:
        self._counts[model] += 1
        if cold_start:
            self._cold[model] += 1
        self._last[model] = datetime.now(UTC)

    def start(self) -> None:
        self._task = asyncio.create_task(self._report_forever(), name="report-requests")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._last:
            return
        counts = [
            RequestCount(
                model_name=name, count=self._counts[name], cold_starts=self._cold[name], last_request_time=last
            )
            for name, last in self._last.items()
        ]
        self._counts.clear()
        self._cold.clear()
        self._last.clear()
        try:
            await self.registry.record_requests(counts)
        except ModelplaneError as error:
            log.debug("request statistics not recorded", error=error.message)
