"""The loader's gRPC edge: convert, call the handler, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelplane.common.converters import to_proto
from modelplane.common.request_context import current_request_id
from modelplane.common.v1 import model_pb2
from modelplane.loader.handlers import LoaderHandler
from modelplane.loader.memory import DeviceReport
from modelplane.loader.v1 import loader_service_pb2 as pb
from modelplane.loader.v1 import loader_service_pb2_grpc as pb_grpc


class LoaderServicer(pb_grpc.LoaderServiceServicer):
    def __init__(self, handler: LoaderHandler) -> None:
        self.handler = handler

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadModelResponse]:
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        async for update in self.handler.load(
            request.name,
            timeout_seconds=timeout,
            refresh=request.refresh,
            reason=request.reason or "operator",
            request_id=current_request_id.get(),
        ):
            response = pb.LoadModelResponse(
                progress=to_proto(update.progress, model_pb2.LoadProgress), done=update.done
            )
            if update.model is not None:
                response.model.CopyFrom(to_proto(update.model, model_pb2.Model))
            response.phase_durations.extend(to_proto(d, model_pb2.PhaseDuration) for d in update.phase_durations)
            yield response

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        model = await self.handler.unload(request.name, reason=request.reason or "operator")
        return pb.UnloadModelResponse(model=to_proto(model, model_pb2.Model))

    async def CancelLoad(
        self, request: pb.CancelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelLoadResponse:
        return pb.CancelLoadResponse(cancelled=await self.handler.cancel(request.name))

    async def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext) -> pb.GetBudgetResponse:
        devices, waiting = await self.handler.budget()
        return pb.GetBudgetResponse(devices=[_device_to_proto(d) for d in devices], loads_waiting=waiting)

    async def Reconcile(self, request: pb.ReconcileRequest, context: grpc.aio.ServicerContext) -> pb.ReconcileResponse:
        result = await self.handler.reconcile()
        return pb.ReconcileResponse(loaded=result.loaded, unloaded=result.unloaded, failed=result.failed)


def _device_to_proto(device: DeviceReport) -> pb.DeviceBudget:
    return pb.DeviceBudget(
        device=device.device,
        capacity_bytes=device.capacity_bytes,
        used_bytes=device.used_bytes,
        shared_bytes=device.shared_bytes,
        total_bytes=device.total_bytes,
        claimed_bytes=device.claimed_bytes,
        observed_used_bytes=device.observed_used_bytes,
        holders=[
            pb.BudgetHolder(
                model_name=h.name,
                bytes=h.bytes,
                measured=h.measured,
                priority=int(h.priority),
                state=int(h.state),
                idle_seconds=h.idle_seconds,
                quota_bytes=h.quota_bytes,
            )
            for h in device.holders
        ],
    )
