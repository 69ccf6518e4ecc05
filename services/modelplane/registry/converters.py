"""Protobuf ⇄ domain conversion for the registry's messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC

from modelplane.common.converters import from_proto, to_proto
from modelplane.common.types import (
    LoadProgress,
    ModelAsset,
    ModelSpec,
    ModelState,
    PackageManifest,
    RequestCount,
    ServingProfile,
)
from modelplane.common.v1 import model_pb2
from modelplane.registry.fleet import Node, NodeDevice, Placement, PlacementTarget
from modelplane.registry.fleet_handlers import PlacementTransition
from modelplane.registry.handlers import Transition
from modelplane.registry.statistics import ModelStatistics
from modelplane.registry.v1 import fleet_pb2
from modelplane.registry.v1 import registry_service_pb2 as pb
from modelplane.registry.watch import Change, NodeChange, PlacementChange


def spec_from_proto(message: model_pb2.ModelSpec) -> ModelSpec:
    return from_proto(message, ModelSpec)


def transition_from_proto(request: pb.TransitionModelRequest) -> Transition:
    return Transition(
        name=request.name,
        version=request.version,
        to_state=ModelState(request.to_state),
        expected_from_state=ModelState(request.expected_from_state),
        message=request.message,
        progress=from_proto(request.progress, LoadProgress) if request.HasField("progress") else None,
        manifest=from_proto(request.manifest, PackageManifest) if request.HasField("manifest") else None,
        profile=from_proto(request.profile, ServingProfile) if request.HasField("profile") else None,
        assets=[from_proto(a, ModelAsset) for a in request.assets] if request.assets else None,
        footprint_bytes=request.footprint_bytes,
        request_id=request.request_id,
        progress_only=request.progress_only,
        begins_operation=request.begins_operation,
    )


def request_counts_from_proto(request: pb.RecordModelRequestsRequest) -> list[RequestCount]:
    return [
        RequestCount(
            model_name=item.model_name,
            count=item.count,
            cold_starts=item.cold_starts,
            last_request_time=item.last_request_time.ToDatetime(tzinfo=UTC),
        )
        for item in request.counts
    ]


def statistics_to_proto(stats: ModelStatistics) -> pb.ModelStatistics:
    return to_proto(stats, pb.ModelStatistics)


def change_to_proto(change: Change) -> pb.WatchModelsResponse:
    response = pb.WatchModelsResponse(change_type=int(change.change_type))
    if isinstance(change, NodeChange):
        response.node.CopyFrom(node_to_proto(change.node))
    elif isinstance(change, PlacementChange):
        response.placement.CopyFrom(placement_to_proto(change.placement))
    else:
        response.model.CopyFrom(to_proto(change.model, model_pb2.Model))
        if change.event is not None:
            response.event.CopyFrom(to_proto(change.event, model_pb2.ModelEvent))
    return response


def node_to_proto(node: Node) -> fleet_pb2.Node:
    return to_proto(node, fleet_pb2.Node)


def node_from_proto(message: fleet_pb2.Node) -> Node:
    return from_proto(message, Node)


def devices_from_proto(devices: Iterable[fleet_pb2.NodeDevice]) -> list[NodeDevice]:
    return [from_proto(d, NodeDevice) for d in devices]


def placement_to_proto(placement: Placement) -> fleet_pb2.Placement:
    return to_proto(placement, fleet_pb2.Placement)


def placement_from_proto(message: fleet_pb2.Placement) -> Placement:
    return from_proto(message, Placement)


def targets_from_proto(request: pb.SetPlacementsRequest) -> list[PlacementTarget]:
    return [from_proto(t, PlacementTarget) for t in request.placements]


def placement_transition_from_proto(request: pb.TransitionPlacementRequest) -> PlacementTransition:
    return PlacementTransition(
        model_name=request.model_name,
        node_id=request.node_id,
        incarnation=request.incarnation,
        version=request.version,
        to_state=ModelState(request.to_state),
        expected_from_state=ModelState(request.expected_from_state),
        message=request.message,
        progress=from_proto(request.progress, LoadProgress) if request.HasField("progress") else None,
        footprint_bytes=request.footprint_bytes,
        observed_generation=request.observed_generation,
        evicted=request.evicted,
        last_used_time=request.last_used_time.ToDatetime(tzinfo=UTC) if request.HasField("last_used_time") else None,
        manifest=from_proto(request.manifest, PackageManifest) if request.HasField("manifest") else None,
        profile=from_proto(request.profile, ServingProfile) if request.HasField("profile") else None,
        assets=[from_proto(a, ModelAsset) for a in request.assets] if request.assets else None,
        request_id=request.request_id,
        progress_only=request.progress_only,
        begins_operation=request.begins_operation,
    )
