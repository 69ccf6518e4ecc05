"""A typed client of the registry's gRPC API, for the other services and the CLI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta

import grpc
from google.protobuf import duration_pb2

from modelplane.common.channels import open_channel
from modelplane.common.converters import from_proto, to_proto
from modelplane.common.errors import AlreadyExists
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
from modelplane.registry.errors import NodeIdInUse
from modelplane.registry.fleet import Node, NodeDevice, NodeState, Placement, PlacementTarget
from modelplane.registry.statistics import ModelStatistics
from modelplane.registry.v1 import fleet_pb2
from modelplane.registry.v1 import registry_service_pb2 as pb
from modelplane.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelplane.registry.watch import Change, ChangeType, ModelChange, NodeChange, PlacementChange


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
        _add_load_facts(request, progress, manifest, profile, assets)
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
        """Streams model changes until the registry goes away; the caller reconnects (with
        include_initial). Nodes and placements are not streamed here: see `watch_fleet`."""
        async for change in self._watch(pb.WatchModelsRequest(names=list(names), include_initial=include_initial)):
            assert isinstance(change, ModelChange)
            yield change

    async def watch_fleet(
        self,
        *,
        names: Sequence[str] = (),
        node_ids: Sequence[str] = (),
        include_initial: bool = True,
        include_nodes: bool = True,
        include_placements: bool = True,
    ) -> AsyncIterator[Change]:
        """Streams model, node and placement changes (ModelChange, NodeChange, PlacementChange)
        until the registry goes away; with include_initial, the current state first: nodes, then
        models, then placements. `names` filters models and placements, `node_ids` nodes and
        placements."""
        request = pb.WatchModelsRequest(
            names=list(names),
            node_ids=list(node_ids),
            include_initial=include_initial,
            include_nodes=include_nodes,
            include_placements=include_placements,
        )
        async for change in self._watch(request):
            yield change

    async def _watch(self, request: pb.WatchModelsRequest) -> AsyncIterator[Change]:
        call = self.stub.WatchModels(request, metadata=outgoing_metadata())
        try:
            async for response in call:
                yield _change_from_proto(response)
        except grpc.aio.AioRpcError as error:
            raise to_modelplane_error(error, peer="registry") from None
        finally:
            call.cancel()

    # The fleet ----------------------------------------------------------------------------------

    async def register_node(
        self, node: Node, *, lease_duration: timedelta | None = None, wait_seconds: float = 0.0
    ) -> Node:
        """Registers this process as `node` (with node.holder naming it: see fleet.new_holder) and
        returns it with its incarnation and lease. While another holder's lease on the id is valid
        the registry refuses (NodeIdInUse); with `wait_seconds`, the call waits for that lease to
        lapse and tries again within that time (a process replacing a crashed one), and raises
        the refusal when the other holder keeps renewing (a second process with the same id)."""
        request = pb.RegisterNodeRequest(node=to_proto(node, fleet_pb2.Node))
        if lease_duration is not None:
            request.lease_duration.CopyFrom(_duration(lease_duration))
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                response = await self._call("RegisterNode", request)
                return from_proto(response.node, Node)
            except AlreadyExists as refused:
                delay = (refused.retry_after_seconds or 0.0) + 0.1
                if refused.reason != NodeIdInUse.reason or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)

    async def renew_node_lease(self, node_id: str, incarnation: int, devices: Sequence[NodeDevice] = ()) -> Node:
        """Renews the lease; raises NodeLeaseLost (FAILED_PRECONDITION) once this process no longer
        holds the node: stop serving its copies and register again."""
        response = await self._call(
            "RenewNodeLease",
            pb.RenewNodeLeaseRequest(
                node_id=node_id,
                incarnation=incarnation,
                devices=[to_proto(d, fleet_pb2.NodeDevice) for d in devices],
            ),
        )
        return from_proto(response.node, Node)

    async def drain_node(self, node_id: str, *, cancel: bool = False) -> Node:
        response = await self._call("DrainNode", pb.DrainNodeRequest(node_id=node_id, cancel=cancel))
        return from_proto(response.node, Node)

    async def delete_node(self, node_id: str) -> None:
        await self._call("DeleteNode", pb.DeleteNodeRequest(node_id=node_id))

    async def list_nodes(self, node_ids: Sequence[str] = (), states: Sequence[NodeState] = ()) -> list[Node]:
        response = await self._call(
            "ListNodes", pb.ListNodesRequest(node_ids=list(node_ids), states=[int(s) for s in states])
        )
        return [from_proto(n, Node) for n in response.nodes]

    async def list_placements(self, model_names: Sequence[str] = (), node_ids: Sequence[str] = ()) -> list[Placement]:
        response = await self._call(
            "ListPlacements", pb.ListPlacementsRequest(model_names=list(model_names), node_ids=list(node_ids))
        )
        return [from_proto(p, Placement) for p in response.placements]

    async def set_placements(
        self,
        targets: Sequence[PlacementTarget],
        removals: Sequence[tuple[str, str]] = (),
        *,
        leader_holder: str = "",
        reasons: Mapping[tuple[str, str], str] | None = None,
    ) -> tuple[list[Placement], list[Placement]]:
        """The placer's writes, in one transaction: the placements as stored, and those removed.
        `reasons`: why each removal (model, node) is made, for the model's events."""
        why = reasons or {}
        request = pb.SetPlacementsRequest(
            placements=[to_proto(t, pb.PlacementTarget) for t in targets],
            removals=[pb.PlacementRef(model_name=m, node_id=n, reason=why.get((m, n), "")) for m, n in removals],
            leader_holder=leader_holder,
        )
        response = await self._call("SetPlacements", request)
        return [from_proto(p, Placement) for p in response.placements], [
            from_proto(p, Placement) for p in response.removed
        ]

    async def ensure_placement(self, name: str, request_id: str = "") -> tuple[list[Placement], str]:
        """A copy of the model for a request that waits for it: its placements and the node to
        send the request to once that copy is READY. Raises NotFound for an unknown model and
        ResourceExhausted (NO_NODE_FITS, with why) when no node can take it."""
        response = await self._call("EnsurePlacement", pb.EnsurePlacementRequest(name=name, request_id=request_id))
        return [from_proto(p, Placement) for p in response.placements], response.node_id

    async def transition_placement(
        self,
        placement: Placement,
        incarnation: int,
        to_state: ModelState,
        message: str = "",
        *,
        expected_from_state: ModelState = ModelState.UNSPECIFIED,
        progress: LoadProgress | None = None,
        footprint_bytes: int = 0,
        observed_generation: int = 0,
        evicted: bool = False,
        last_used_time: datetime | None = None,
        manifest: PackageManifest | None = None,
        profile: ServingProfile | None = None,
        assets: Sequence[ModelAsset] | None = None,
        progress_only: bool = False,
        begins_operation: bool = False,
        request_id: str = "",
    ) -> tuple[Placement, Model]:
        """Records a transition of this node's copy of a model (at the placement's version); returns
        the placement and the model, whose status is derived from its copies."""
        request = pb.TransitionPlacementRequest(
            model_name=placement.model_name,
            node_id=placement.node_id,
            incarnation=incarnation,
            version=placement.version,
            to_state=int(to_state),
            expected_from_state=int(expected_from_state),
            message=message,
            footprint_bytes=footprint_bytes,
            observed_generation=observed_generation,
            evicted=evicted,
            progress_only=progress_only,
            begins_operation=begins_operation,
            request_id=request_id,
        )
        if last_used_time is not None:
            request.last_used_time.FromDatetime(last_used_time)
        _add_load_facts(request, progress, manifest, profile, assets)
        response = await self._call("TransitionPlacement", request)
        return from_proto(response.placement, Placement), from_proto(response.model, Model)


def _add_load_facts(
    request: pb.TransitionModelRequest | pb.TransitionPlacementRequest,
    progress: LoadProgress | None,
    manifest: PackageManifest | None,
    profile: ServingProfile | None,
    assets: Sequence[ModelAsset] | None,
) -> None:
    """Sets what a transition reports of a load (both transition requests carry the same fields)."""
    if progress is not None:
        request.progress.CopyFrom(to_proto(progress, model_pb2.LoadProgress))
    if manifest is not None:
        request.manifest.CopyFrom(to_proto(manifest, model_pb2.PackageManifest))
    if profile is not None:
        request.profile.CopyFrom(to_proto(profile, model_pb2.ServingProfile))
    if assets:
        request.assets.extend(to_proto(a, model_pb2.ModelAsset) for a in assets)


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _change_from_proto(response: pb.WatchModelsResponse) -> Change:
    change_type = ChangeType(response.change_type)
    if response.HasField("node"):
        return NodeChange(change_type, from_proto(response.node, Node))
    if response.HasField("placement"):
        return PlacementChange(change_type, from_proto(response.placement, Placement))
    event = from_proto(response.event, ModelEvent) if response.HasField("event") else None
    return ModelChange(change_type, from_proto(response.model, Model), event)
