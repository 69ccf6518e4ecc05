"""A typed client of the registry's gRPC API, for the other services and the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from modelplane.common.channels import open_channel
from modelplane.common.converters import from_proto, to_proto
from modelplane.common.grpc_errors import to_modelplane_error
from modelplane.common.request_context import outgoing_metadata
from modelplane.common.types import (
    DesiredState,
    LoadProgress,
    Model,
    ModelAsset,
    ModelEvent,
    ModelSpec,
    ModelState,
    PackageManifest,
    RequestCount,
    ServingProfile,
    Task,
)
from modelplane.common.v1 import model_pb2
from modelplane.registry.statistics import ModelStatistics
from modelplane.registry.v1 import registry_service_pb2 as pb
from modelplane.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelplane.registry.watch import ChangeType, ModelChange


class RegistryClient:
    def __init__(self, address: str, *, timeout_seconds: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout_seconds
        self.channel = open_channel(address)
        self.stub = pb_grpc.RegistryServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: object) -> object:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="registry") from None

    async def register(self, spec: ModelSpec, *, load: bool = False) -> tuple[Model, bool]:
        response = await self._call(
            "RegisterModel", pb.RegisterModelRequest(spec=to_proto(spec, model_pb2.ModelSpec), load=load)
        )
        return from_proto(response.model, Model), response.created

    async def get_model(self, name: str) -> Model:
        response = await self._call("GetModel", pb.GetModelRequest(name=name))
        return from_proto(response.model, Model)

    async def list_models(self, *, task: Task = Task.UNSPECIFIED, states: Sequence[ModelState] = ()) -> list[Model]:
        models: list[Model] = []
        token = ""
        while True:
            response = await self._call(
                "ListModels",
                pb.ListModelsRequest(task=int(task), states=[int(s) for s in states], page_size=1000, page_token=token),
            )
            models.extend(from_proto(m, Model) for m in response.models)
            token = response.next_page_token
            if not token:
                return models

    async def set_desired_state(self, name: str, desired: DesiredState) -> Model:
        response = await self._call("SetDesiredState", pb.SetDesiredStateRequest(name=name, desired_state=int(desired)))
        return from_proto(response.model, Model)

    async def delete(self, name: str) -> None:
        await self._call("DeleteModel", pb.DeleteModelRequest(name=name))

    async def transition(
        self,
        model: Model,
        to_state: ModelState,
        message: str = "",
        *,
        expected_from_state: ModelState = ModelState.UNSPECIFIED,
        progress: LoadProgress | None = None,
        manifest: PackageManifest | None = None,
        profile: ServingProfile | None = None,
        assets: Sequence[ModelAsset] | None = None,
        footprint_bytes: int = 0,
        progress_only: bool = False,
        begins_operation: bool = False,
        request_id: str = "",
    ) -> Model:
        request = pb.TransitionModelRequest(
            name=model.name,
            version=model.version,
            to_state=int(to_state),
            expected_from_state=int(expected_from_state),
            message=message,
            footprint_bytes=footprint_bytes,
            progress_only=progress_only,
            begins_operation=begins_operation,
            request_id=request_id,
        )
        if progress is not None:
            request.progress.CopyFrom(to_proto(progress, model_pb2.LoadProgress))
        if manifest is not None:
            request.manifest.CopyFrom(to_proto(manifest, model_pb2.PackageManifest))
        if profile is not None:
            request.profile.CopyFrom(to_proto(profile, model_pb2.ServingProfile))
        if assets:
            request.assets.extend(to_proto(a, model_pb2.ModelAsset) for a in assets)
        response = await self._call("TransitionModel", request)
        return from_proto(response.model, Model)

    async def events(self, name: str = "", *, after_id: int = 0) -> list[ModelEvent]:
        response = await self._call(
            "ListModelEvents", pb.ListModelEventsRequest(name=name, after_id=after_id, page_size=1000)
        )
        return [from_proto(e, ModelEvent) for e in response.events]

    async def get_assets(self, name: str) -> tuple[ServingProfile, list[ModelAsset]]:
        response = await self._call("GetModelAssets", pb.GetModelAssetsRequest(name=name))
        return from_proto(response.profile, ServingProfile), [from_proto(a, ModelAsset) for a in response.assets]

    async def record_requests(self, counts: Sequence[RequestCount]) -> None:
        request = pb.RecordModelRequestsRequest()
        for item in counts:
            entry = request.counts.add(model_name=item.model_name, count=item.count, cold_starts=item.cold_starts)
            entry.last_request_time.FromDatetime(item.last_request_time)
        await self._call("RecordModelRequests", request)

    async def statistics(self, names: Sequence[str] = ()) -> list[ModelStatistics]:
        response = await self._call("GetModelStatistics", pb.GetModelStatisticsRequest(names=list(names)))
        return [from_proto(s, ModelStatistics) for s in response.statistics]

    async def watch(self, *, names: Sequence[str] = (), include_initial: bool = True) -> AsyncIterator[ModelChange]:
        """Streams changes until the registry goes away; the caller reconnects (with include_initial)."""
        call = self.stub.WatchModels(
            pb.WatchModelsRequest(names=list(names), include_initial=include_initial), metadata=outgoing_metadata()
        )
        try:
            async for response in call:
                event = from_proto(response.event, ModelEvent) if response.HasField("event") else None
                yield ModelChange(ChangeType(response.change_type), from_proto(response.model, Model), event)
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="registry") from None
        finally:
            call.cancel()
