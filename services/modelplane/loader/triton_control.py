"""The loader's view of Triton: load, unload and list models over the KServe v2 gRPC protocol."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from modelplane.loader.errors import TritonLoadFailed, TritonUnavailable

log = structlog.get_logger()


@dataclass(frozen=True)
class TritonModelState:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str


class TritonControl:
    def __init__(self, address: str) -> None:
        self.address = address
        self.client = triton_aio.InferenceServerClient(address)

    async def close(self) -> None:
        await self.client.close()

    async def is_live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def load(self, name: str, *, timeout_seconds: float) -> None:
        try:
            await asyncio.wait_for(self.client.load_model(name), timeout=timeout_seconds)
        except InferenceServerException as error:
            message = error.message() or str(error)
            if _is_connection_error(message):
                raise TritonUnavailable(
                    f"Triton at {self.address} is not reachable ({message}); it may be restarting.",
                    retry_after_seconds=2.0,
                ) from None
            raise TritonLoadFailed(f"Triton refused to load '{name}': {message}") from None

    async def unload(self, name: str) -> None:
        try:
            await self.client.unload_model(name)
        except InferenceServerException as error:
            raise TritonUnavailable(f"Triton could not unload '{name}': {error.message()}") from None

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name))
        except InferenceServerException:
            return False

    async def index(self) -> list[TritonModelState]:
        """Every model in the repository, loaded or not, as Triton reports it."""
        try:
            response = await self.client.get_model_repository_index()
        except InferenceServerException as error:
            raise TritonUnavailable(f"Triton at {self.address} is not reachable: {error.message()}") from None
        return [TritonModelState(m.name, m.version, m.state, m.reason) for m in response.models]


def _is_connection_error(message: str) -> bool:
    lowered = message.lower()
    return any(hint in lowered for hint in ("unavailable", "connection refused", "failed to connect", "socket closed"))
