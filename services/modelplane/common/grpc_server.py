"""A grpc.aio server with health, reflection, the service interceptor and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from modelplane.common.interceptors import ServiceInterceptor
from modelplane.common.settings import ServerSettings

log = structlog.get_logger()


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


class GrpcServer:
    """One service's server. `start()` binds and returns the port; `stop()` drains and closes."""

    def __init__(self, service: str, settings: ServerSettings) -> None:
        self.service = service
        self.settings = settings
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor()], options=message_size_options(settings.max_message_bytes)
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0

    def add_servicer(
        self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str
    ) -> None:
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        reflection.enable_server_reflection(self._service_names, self.server)
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port}; is the port in use?")
        await self.server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc server started", port=self.port, services=self._service_names[2:])
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING first, so load balancers stop sending, then requests drain."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        log.info("grpc server stopped")


async def wait_for_termination_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def start_metrics_server(port: int | None) -> None:
    """Serves this process's Prometheus metrics on their own port, when one is configured."""
    if port:
        start_http_server(port)
        log.info("metrics endpoint started", port=port)
