"""What every service process has in common: start, stop, and run until SIGTERM."""

from __future__ import annotations

import abc
import asyncio

import structlog

from modelplane.common.grpc_server import wait_for_termination_signal
from modelplane.common.settings import RuntimeSettings

log = structlog.get_logger()


class Service(abc.ABC):
    """A service that can run in its own process (`modelplane serve`) or inside a test."""

    name: str
    # uvloop starts child processes with fork(), and a child forked while gRPC's threads are busy
    # can crash before it execs (seen: a converter dead of SIGSEGV 7 ms after the fork). asyncio's
    # own loop uses vfork, which does not copy them. A service that starts processes stays on it.
    starts_processes: bool = False

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


def run_service(service_class: type[Service]) -> None:
    """Runs a service in this process until SIGTERM, on the event loop MODELPLANE_EVENT_LOOP names
    (asyncio for a service that starts child processes)."""

    async def main() -> None:
        # Built inside the loop: gRPC's aio server binds to the loop that is running when it is made.
        await run_until_signalled(service_class())

    if RuntimeSettings().event_loop == "uvloop" and not service_class.starts_processes:
        import uvloop  # noqa: PLC0415 - only the services' processes need it

        uvloop.run(main())
    else:
        asyncio.run(main())
