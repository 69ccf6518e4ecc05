"""The registry service process."""

from __future__ import annotations

import asyncio
import contextlib

from modelplane.common.grpc_server import GrpcServer
from modelplane.common.service import Service
from modelplane.registry.fleet_handlers import FleetHandler
from modelplane.registry.handlers import RegistryHandler
from modelplane.registry.placer import Placer
from modelplane.registry.servicer import RegistryServicer
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.store import RegistryStore
from modelplane.registry.sweeper import NodeSweeper
from modelplane.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

SERVICE_FULL_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
# Called on a timer by the other services (request statistics, reconciliation, node leases):
# logged at debug unless they fail, so that the log shows what changed rather than who polled.
ROUTINE_METHODS = frozenset(
    f"/{SERVICE_FULL_NAME}/{method}"
    for method in (
        "GetModelStatistics",
        "RecordModelRequests",
        "ListModels",
        "RenewNodeLease",
        "ListNodes",
        "ListPlacements",
        "EnsurePlacement",
    )
)


class RegistryService(Service):
    name = "registry"

    def __init__(self, settings: RegistrySettings | None = None) -> None:
        self.settings = settings or RegistrySettings()
        self.server = GrpcServer(self.name, self.settings, routine_methods=ROUTINE_METHODS)
        self.store: RegistryStore | None = None
        self.fleet: FleetHandler | None = None
        self.port = 0
        self.placer: Placer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._placing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.store = await RegistryStore.open(self.settings.database_url)
        self.fleet = FleetHandler(self.store)
        self.placer = Placer(self.store, self.fleet, self.settings)
        self.server.add_servicer(
            registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
            RegistryServicer(RegistryHandler(self.store), self.fleet, self.placer),
            SERVICE_FULL_NAME,
        )
        self.port = await self.server.start()
        sweeper = NodeSweeper(self.store, self.fleet, self.settings.node_sweep_interval_seconds)
        self._sweeper = asyncio.create_task(sweeper.run(), name="sweep-lost-nodes")
        if self.settings.placer:
            self._placing = asyncio.create_task(self.placer.run(), name="placer")

    async def stop(self) -> None:
        for task in (self._placing, self._sweeper):  # the placer first: it gives its lease up
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Watch streams never end on their own; end them so the server's grace period is not spent waiting.
        if self.store is not None:
            self.store.changes.close()
        await self.server.stop()
        if self.store is not None:
            await self.store.close()
