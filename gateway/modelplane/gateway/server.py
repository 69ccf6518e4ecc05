"""The gateway process: uvicorn serving the FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from modelplane.common.service import Service
from modelplane.gateway.app import create_app
from modelplane.gateway.settings import GatewaySettings


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process's Service runner owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService(Service):
    name = "gateway"

    def __init__(self, settings: GatewaySettings | None = None) -> None:
        self.settings = settings or GatewaySettings()
        if (self.settings.tls_cert_file is None) != (self.settings.tls_key_file is None):
            raise ValueError(
                "HTTPS needs both MODELPLANE_GATEWAY_TLS_CERT_FILE and MODELPLANE_GATEWAY_TLS_KEY_FILE; one is unset."
            )
        config = uvicorn.Config(
            create_app(self.settings),
            host=self.settings.host,
            port=self.settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(self.settings.shutdown_grace_seconds),
            timeout_keep_alive=self.settings.keep_alive_seconds,
            lifespan="on",
            ssl_certfile=self.settings.tls_cert_file,
            ssl_keyfile=self.settings.tls_key_file,
        )
        self.server = _EmbeddedServer(config)
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(), name="uvicorn")
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"gateway failed to start on {self.settings.host}:{self.settings.port}")
            await asyncio.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
