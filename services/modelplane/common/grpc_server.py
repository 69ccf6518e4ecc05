"""A grpc.aio server with health, reflection, the service interceptor, metrics, mTLS when
configured, and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from modelplane.common.interceptors import ServiceInterceptor
from modelplane.common.settings import ServerSettings
from modelplane.common.tls import process_tls

log = structlog.get_logger()


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


# The clients (common/channels.py) ping every 20 s, also on idle connections such as a quiet
# WatchModels stream. gRPC servers by default accept a ping without data only every 5 minutes and
# answer more with GOAWAY "too_many_pings", which drops every call on that connection; accept
# what our own clients send.
# gRPC 1.81's server reads the limit from min_ping_interval_without_data_ms (checked here: with
# only the documented min_recv_... name it still sent GOAWAY); both are set.
KEEPALIVE_ENFORCEMENT = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class GrpcServer:
    """One service's server. `start()` binds and returns the port; `stop()` drains and closes."""

    def __init__(
        self, service: str, settings: ServerSettings, *, routine_methods: frozenset[str] = frozenset()
    ) -> None:
        """`routine_methods`: full names of the methods other services poll; their successful
        calls are logged at debug."""
        self.service = service
        self.settings = settings
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(routine_methods)],
            options=[*message_size_options(settings.max_message_bytes), *KEEPALIVE_ENFORCEMENT],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0
        self.tls = process_tls()
        # Probes that cannot present a client certificate get the health service alone, in plaintext.
        self._health_server: grpc.aio.Server | None = None
        if settings.health_port:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self._metrics: MetricsEndpoint | None = None

    def add_servicer(
        self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str
    ) -> None:
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.tls is not None:
            self.port = self.server.add_secure_port(address, self.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}; is the port in use?")
        if self._health_server is not None:
            health_address = f"{self.settings.host}:{self.settings.health_port}"
            if not self._health_server.add_insecure_port(health_address):
                raise OSError(f"cannot listen on {health_address} (health_port); is the port in use?")
            await self._health_server.start()
        await self.server.start()
        self._metrics = MetricsEndpoint.start(self.settings.host, self.settings.metrics_port)
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "grpc server started",
            port=self.port,
            mtls=self.tls is not None,
            health_port=self.settings.health_port or None,
            metrics_port=self.settings.metrics_port or None,
            services=self._service_names[2:],
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING first, so load balancers stop sending, then requests drain."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics is not None:
            self._metrics.stop()
        log.info("grpc server stopped")


async def wait_for_termination_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class MetricsEndpoint:
    """This process's Prometheus metrics over plain HTTP on a port of their own (GET /metrics)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, host: str, port: int) -> MetricsEndpoint | None:
        """Starts serving when a port is configured; returns None for port 0."""
        if not port:
            return None
        try:
            server, thread = start_http_server(port, addr=host)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port} ({error}); is the port in use?") from error
        return cls(server, thread)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
