"""The gateway's gRPC clients. Every call carries the request id and the request's deadline, and
every failure becomes a ModelplaneError that errors.py turns into an HTTP response."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import Request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.channels import open_channel
from modelplane.common.grpc_errors import to_modelplane_error
from modelplane.common.request_context import outgoing_metadata
from modelplane.inference.v1 import inference_service_pb2_grpc
from modelplane.registry.v1 import registry_service_pb2_grpc


class Backends:
    def __init__(self, inference_address: str, registry_address: str, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        self._inference_channel = open_channel(inference_address)
        self._registry_channel = open_channel(registry_address)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self._inference_channel)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self._registry_channel)
        self._health = {
            "inference": health_pb2_grpc.HealthStub(self._inference_channel),
            "registry": health_pb2_grpc.HealthStub(self._registry_channel),
        }

    async def close(self) -> None:
        await self._inference_channel.close()
        await self._registry_channel.close()

    async def unary(self, peer: str, method: Any, request: Any, *, deadline_seconds: float | None = None) -> Any:
        try:
            return await method(request, timeout=deadline_seconds or self.timeout, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer=peer) from None

    async def health(self) -> dict[str, bool]:
        """Whether each backend answers its health check as SERVING."""
        status = {}
        for name, stub in self._health.items():
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                status[name] = response.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                status[name] = False
        return status


def backends(request: Request) -> Backends:
    """The gRPC clients of the application serving this request."""
    return request.app.state.backends
