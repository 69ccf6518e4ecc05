"""The loader service process."""

from __future__ import annotations

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.grpc_server import GrpcServer
from modelplane.common.service import Service
from modelplane.common.settings import TritonSettings
from modelplane.loader.cache import PackageCache
from modelplane.loader.devices import GpuMemoryReader
from modelplane.loader.footprint import BackendProcesses
from modelplane.loader.handlers import LoaderHandler
from modelplane.loader.memory import MemoryManager
from modelplane.loader.pipeline import LoadPipeline
from modelplane.loader.servicer import LoaderServicer
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.loader.v1 import loader_service_pb2, loader_service_pb2_grpc
from modelplane.registry.client import RegistryClient
from modelplane.triton.client import TritonTls

log = structlog.get_logger()
SERVICE_FULL_NAME = loader_service_pb2.DESCRIPTOR.services_by_name["LoaderService"].full_name


class LoaderService(Service):
    name = "loader"
    starts_processes = True  # converters and GGUF readers: see Service.starts_processes

    def __init__(self, settings: LoaderSettings | None = None, triton: TritonSettings | None = None) -> None:
        self.settings = settings or LoaderSettings()
        self.triton_settings = triton or TritonSettings()
        self.server = GrpcServer(self.name, self.settings)
        self.port = 0
        self.handler: LoaderHandler | None = None

    async def start(self) -> None:
        registry = RegistryClient(self.settings.registry_address)
        triton = TritonControl(self.triton_settings.grpc_address, TritonTls.from_settings(self.triton_settings))
        repository = ModelRepository(self.triton_settings.model_repository)
        cache = PackageCache.from_settings(self.settings)
        pipeline = LoadPipeline(self.settings, registry, cache, repository, triton)
        # The embedded Triton's backend processes run on this host, where their memory can be read.
        processes = BackendProcesses(repository.root) if self.triton_settings.embedded else None
        metrics_url = (
            self.settings.triton_metrics_url or f"http://127.0.0.1:{self.triton_settings.metrics_port}/metrics"
        )
        memory = MemoryManager(self.settings, repository, processes=processes, gpus=GpuMemoryReader(metrics_url))
        self.handler = LoaderHandler(
            self.settings,
            registry,
            pipeline,
            triton,
            repository,
            memory,
            triton_address=self.triton_settings.grpc_address,
            loader_port=lambda: self.port,
        )
        self.server.add_servicer(
            loader_service_pb2_grpc.add_LoaderServiceServicer_to_server, LoaderServicer(self.handler), SERVICE_FULL_NAME
        )
        self.port = await self.server.start()
        try:
            await self.handler.register_node()
        except ModelplaneError as refused:
            # Another process holds this node id (or the registry refused the node as configured):
            # this one must not act as the node. Say who holds it and stop with a non-zero status.
            log.error(
                "node not registered; the loader does not start", node=self.settings.node_id, error=refused.message
            )
            await self.stop()
            raise SystemExit(f"error: {refused.message}") from None
        self.handler.start_background()

    async def stop(self) -> None:
        await self.server.stop()
        if self.handler is not None:
            await self.handler.stop_background()
            await self.handler.registry.close()
            await self.handler.triton.close()
