"""The loader's gRPC edge: convert, call the handler, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import psutil

from modelplane.common.converters import to_proto
from modelplane.common.request_context import current_request_id
from modelplane.common.types import RESIDENT_STATES
from modelplane.common.v1 import model_pb2
from modelplane.loader.handlers import LoaderHandler
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
        models = await self.handler.registry.list_models(states=sorted(RESIDENT_STATES))
        holders = [
            pb.BudgetHolder(
                model_name=m.name,
                bytes=m.status.footprint_bytes or m.spec.memory_estimate_bytes,
                measured=bool(m.status.footprint_bytes),
                priority=int(m.spec.effective_priority),
                state=int(m.state),
            )
            for m in models
        ]
        device = pb.DeviceBudget(
            device="cpu",
            capacity_bytes=psutil.virtual_memory().total,
            used_bytes=sum(h.bytes for h in holders),
            holders=holders,
        )
        return pb.GetBudgetResponse(devices=[device], loads_waiting=len(self.handler.jobs))

    async def Reconcile(self, request: pb.ReconcileRequest, context: grpc.aio.ServicerContext) -> pb.ReconcileResponse:
        result = await self.handler.reconcile()
        return pb.ReconcileResponse(loaded=result.loaded, unloaded=result.unloaded, failed=result.failed)
