"""What every service process has in common: start, stop, and run until SIGTERM."""

from __future__ import annotations

import abc

import structlog

from modelplane.common.grpc_server import wait_for_termination_signal

log = structlog.get_logger()


class Service(abc.ABC):
    """A service that can run in its own process (`modelplane serve`) or inside a test."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Binds its ports and is ready to serve when this returns."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Drains requests in flight and releases everything it holds."""


async def run_until_signalled(service: Service) -> None:
    await service.start()
    try:
        await wait_for_termination_signal()
        log.info("termination signal received; shutting down")
    finally:
        await service.stop()
