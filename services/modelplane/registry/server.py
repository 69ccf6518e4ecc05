"""The registry service process."""

from __future__ import annotations

from modelplane.common.grpc_server import GrpcServer
from modelplane.common.service import Service
from modelplane.registry.handlers import RegistryHandler
from modelplane.registry.servicer import RegistryServicer
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.store import RegistryStore
from modelplane.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

SERVICE_FULL_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
# Called on a timer by the other services (request statistics, reconciliation): logged at debug
# unless they fail, so that the log shows what changed rather than who polled.
ROUTINE_METHODS = frozenset(
    f"/{SERVICE_FULL_NAME}/{method}" for method in ("GetModelStatistics", "RecordModelRequests", "ListModels")
)


class RegistryService(Service):
    name = "registry"

    def __init__(self, settings: RegistrySettings | None = None) -> None:
        self.settings = settings or RegistrySettings()
        self.server = GrpcServer(self.name, self.settings, routine_methods=ROUTINE_METHODS)
        self.store: RegistryStore | None = None
        self.port = 0

    async def start(self) -> None:
        self.store = await RegistryStore.open(self.settings.database_url)
        handler = RegistryHandler(self.store)
        self.server.add_servicer(
            registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
            RegistryServicer(handler),
            SERVICE_FULL_NAME,
        )
        self.port = await self.server.start()

    async def stop(self) -> None:
        # Watch streams never end on their own; end them so the server's grace period is not spent waiting.
        if self.store is not None:
            self.store.changes.close()
        await self.server.stop()
        if self.store is not None:
            await self.store.close()
