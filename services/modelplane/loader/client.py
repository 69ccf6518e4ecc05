"""A typed client of the loader's gRPC API, for the inference service and the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from modelplane.common.channels import open_channel
from modelplane.common.converters import from_proto
from modelplane.common.grpc_errors import to_modelplane_error
from modelplane.common.request_context import outgoing_metadata
from modelplane.common.types import LoadProgress, Model, PhaseDuration
from modelplane.loader.types import LoadUpdate
from modelplane.loader.v1 import loader_service_pb2 as pb
from modelplane.loader.v1 import loader_service_pb2_grpc as pb_grpc


class LoaderClient:
    def __init__(self, address: str, *, timeout_seconds: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout_seconds
        self.channel = open_channel(address)
        self.stub = pb_grpc.LoaderServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> LoaderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def load(
        self, name: str, *, reason: str = "operator", timeout_seconds: float | None = None, refresh: bool = False
    ) -> AsyncIterator[LoadUpdate]:
        request = pb.LoadModelRequest(name=name, reason=reason, refresh=refresh)
        if timeout_seconds is not None:
            request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout_seconds)))
        call = self.stub.LoadModel(
            request, metadata=outgoing_metadata(), timeout=(timeout_seconds + 5) if timeout_seconds else None
        )
        try:
            async for response in call:
                yield LoadUpdate(
                    progress=from_proto(response.progress, LoadProgress),
                    done=response.done,
                    model=from_proto(response.model, Model) if response.HasField("model") else None,
                    phase_durations=[from_proto(d, PhaseDuration) for d in response.phase_durations],
                )
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="loader") from None
        finally:
            call.cancel()

    async def ensure_loaded(self, name: str, *, reason: str, timeout_seconds: float) -> Model:
        async for update in self.load(name, reason=reason, timeout_seconds=timeout_seconds):
            if update.done and update.model is not None:
                return update.model
        raise RuntimeError("the loader ended the LoadModel stream without a final update")

    async def unload(self, name: str, *, reason: str = "operator") -> Model:
        try:
            response = await self.stub.UnloadModel(
                pb.UnloadModelRequest(name=name, reason=reason), metadata=outgoing_metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="loader") from None
        return from_proto(response.model, Model)

    async def cancel(self, name: str) -> bool:
        try:
            response = await self.stub.CancelLoad(
                pb.CancelLoadRequest(name=name), metadata=outgoing_metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="loader") from None
        return response.cancelled

    async def budget(self) -> pb.GetBudgetResponse:
        """The budget as the loader reports it (the CLI prints the message as it is)."""
        try:
            return await self.stub.GetBudget(pb.GetBudgetRequest(), metadata=outgoing_metadata(), timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="loader") from None
