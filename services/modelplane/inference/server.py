"""The inference service process."""

from __future__ import annotations

from modelplane.common.grpc_server import GrpcServer
from modelplane.common.service import Service
from modelplane.common.settings import TritonSettings
from modelplane.inference.catalog import FleetOnDemand, ModelCatalog
from modelplane.inference.handlers import InferenceHandler
from modelplane.inference.routing import Router, RoutingTable
from modelplane.inference.servicer import InferenceServicer
from modelplane.inference.settings import InferenceSettings
from modelplane.inference.stats import RequestStatistics
from modelplane.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from modelplane.triton.client import TritonTls

SERVICE_FULL_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class InferenceService(Service):
    name = "inference"

    def __init__(self, settings: InferenceSettings | None = None, triton: TritonSettings | None = None) -> None:
        self.settings = settings or InferenceSettings()
        self.triton_settings = triton or TritonSettings()
        self.server = GrpcServer(self.name, self.settings)
        self.port = 0
        self._closers: list = []

    async def start(self) -> None:
        registry = RegistryClient(self.settings.registry_address)
        loader = LoaderClient(self.settings.loader_address)
        # Until the registry knows nodes, the configured Triton serves every model as node-0.
        table = RoutingTable(self.triton_settings.grpc_address)
        self.router = Router(table, TritonTls.from_settings(self.triton_settings))
        self.catalog = ModelCatalog(registry, FleetOnDemand(registry, loader, table), table)
        self.stats = RequestStatistics(registry, self.settings.stats_report_interval_seconds)
        handler = InferenceHandler(self.settings, self.catalog, self.router, self.stats)
        self.servicer = InferenceServicer(handler)
        self.server.add_servicer(
            inference_service_pb2_grpc.add_InferenceServiceServicer_to_server, self.servicer, SERVICE_FULL_NAME
        )
        self.catalog.start()
        self.stats.start()
        self.port = await self.server.start()
        self._closers = [handler.encoder_calls.close, registry.close, loader.close, self.router.close]

    async def stop(self) -> None:
        # Open streams answer what is under way and end, so their clients reconnect to a service that is up.
        self.servicer.streams.drain()
        await self.server.stop()
        await self.catalog.stop()
        await self.stats.stop()
        for close in self._closers:
            await close()
