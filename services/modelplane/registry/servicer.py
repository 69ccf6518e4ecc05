"""The registry's gRPC edge: convert, call the handler, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelplane.common.converters import to_proto
from modelplane.common.request_context import current_request_id
from modelplane.common.types import DesiredState, ModelState, Task
from modelplane.common.v1 import model_pb2
from modelplane.registry import converters
from modelplane.registry.fleet import NodeState
from modelplane.registry.fleet_handlers import FleetHandler
from modelplane.registry.handlers import RegistryHandler
from modelplane.registry.placer import Placer
from modelplane.registry.v1 import registry_service_pb2 as pb
from modelplane.registry.v1 import registry_service_pb2_grpc as pb_grpc


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, handler: RegistryHandler, fleet: FleetHandler, placer: Placer) -> None:
        self.handler = handler
        self.fleet = fleet
        self.placer = placer

    async def RegisterModel(
        self, request: pb.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterModelResponse:
        model, created = await self.handler.register(
            converters.spec_from_proto(request.spec), load=request.load, request_id=current_request_id.get()
        )
        return pb.RegisterModelResponse(model=to_proto(model, model_pb2.Model), created=created)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=to_proto(await self.handler.get(request.name), model_pb2.Model))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models, token = await self.handler.list(
            task=Task(request.task),
            states=[ModelState(s) for s in request.states],
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListModelsResponse(models=[to_proto(m, model_pb2.Model) for m in models], next_page_token=token)

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        model = await self.handler.update(converters.spec_from_proto(request.spec), list(request.update_mask.paths))
        return pb.UpdateModelResponse(model=to_proto(model, model_pb2.Model))

    async def SetDesiredState(
        self, request: pb.SetDesiredStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetDesiredStateResponse:
        model = await self.handler.set_desired_state(request.name, DesiredState(request.desired_state))
        return pb.SetDesiredStateResponse(model=to_proto(model, model_pb2.Model))

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        await self.handler.delete(request.name)
        return pb.DeleteModelResponse()

    async def TransitionModel(
        self, request: pb.TransitionModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransitionModelResponse:
        model, event = await self.handler.transition(converters.transition_from_proto(request))
        response = pb.TransitionModelResponse(model=to_proto(model, model_pb2.Model))
        if event is not None:
            response.event.CopyFrom(to_proto(event, model_pb2.ModelEvent))
        return response

    async def ListModelEvents(
        self, request: pb.ListModelEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelEventsResponse:
        events = await self.handler.events(name=request.name, after_id=request.after_id, page_size=request.page_size)
        return pb.ListModelEventsResponse(events=[to_proto(e, model_pb2.ModelEvent) for e in events])

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchModelsResponse]:
        changes = self.handler.watch(
            names=list(request.names),
            include_initial=request.include_initial,
            include_nodes=request.include_nodes,
            include_placements=request.include_placements,
            node_ids=list(request.node_ids),
        )
        async for change in changes:
            yield converters.change_to_proto(change)

    async def GetModelAssets(
        self, request: pb.GetModelAssetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelAssetsResponse:
        profile, assets = await self.handler.assets(request.name)
        return pb.GetModelAssetsResponse(
            profile=to_proto(profile, model_pb2.ServingProfile),
            assets=[to_proto(a, model_pb2.ModelAsset) for a in assets],
        )

    async def RecordModelRequests(
        self, request: pb.RecordModelRequestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordModelRequestsResponse:
        await self.handler.record_requests(converters.request_counts_from_proto(request))
        return pb.RecordModelRequestsResponse()

    async def GetModelStatistics(
        self, request: pb.GetModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelStatisticsResponse:
        stats = await self.handler.statistics(list(request.names))
        return pb.GetModelStatisticsResponse(statistics=[converters.statistics_to_proto(s) for s in stats])

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNodeResponse:
        duration = request.lease_duration.ToTimedelta() if request.HasField("lease_duration") else None
        node = await self.fleet.register_node(converters.node_from_proto(request.node), duration)
        return pb.RegisterNodeResponse(node=converters.node_to_proto(node))

    async def RenewNodeLease(
        self, request: pb.RenewNodeLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewNodeLeaseResponse:
        node = await self.fleet.renew_node_lease(
            request.node_id, request.incarnation, converters.devices_from_proto(request.devices)
        )
        return pb.RenewNodeLeaseResponse(node=converters.node_to_proto(node))

    async def DrainNode(self, request: pb.DrainNodeRequest, context: grpc.aio.ServicerContext) -> pb.DrainNodeResponse:
        node = await self.fleet.drain_node(request.node_id, cancel=request.cancel)
        return pb.DrainNodeResponse(node=converters.node_to_proto(node))

    async def DeleteNode(
        self, request: pb.DeleteNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteNodeResponse:
        await self.fleet.delete_node(request.node_id)
        return pb.DeleteNodeResponse()

    async def ListNodes(self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext) -> pb.ListNodesResponse:
        nodes = await self.fleet.list_nodes(list(request.node_ids), [NodeState(s) for s in request.states])
        return pb.ListNodesResponse(nodes=[converters.node_to_proto(n) for n in nodes])

    async def ListPlacements(
        self, request: pb.ListPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPlacementsResponse:
        placements = await self.fleet.list_placements(list(request.model_names), list(request.node_ids))
        return pb.ListPlacementsResponse(placements=[converters.placement_to_proto(p) for p in placements])

    async def SetPlacements(
        self, request: pb.SetPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPlacementsResponse:
        placements, removed = await self.fleet.set_placements(
            converters.targets_from_proto(request),
            [(r.model_name, r.node_id) for r in request.removals],
            leader_holder=request.leader_holder,
            reasons={(r.model_name, r.node_id): r.reason for r in request.removals if r.reason},
        )
        return pb.SetPlacementsResponse(
            placements=[converters.placement_to_proto(p) for p in placements],
            removed=[converters.placement_to_proto(p) for p in removed],
        )

    async def TransitionPlacement(
        self, request: pb.TransitionPlacementRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransitionPlacementResponse:
        placement, model, event = await self.fleet.transition_placement(
            converters.placement_transition_from_proto(request)
        )
        response = pb.TransitionPlacementResponse(
            placement=converters.placement_to_proto(placement), model=to_proto(model, model_pb2.Model)
        )
        if event is not None:
            response.event.CopyFrom(to_proto(event, model_pb2.ModelEvent))
        return response

    async def EnsurePlacement(
        self, request: pb.EnsurePlacementRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnsurePlacementResponse:
        placements, node_id = await self.placer.ensure(request.name, request.request_id or current_request_id.get())
        return pb.EnsurePlacementResponse(
            placements=[converters.placement_to_proto(p) for p in placements], node_id=node_id
        )


__all__ = ["RegistryServicer"]
