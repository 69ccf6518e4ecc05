"""The loader service process."""

from __future__ import annotations

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
        triton = TritonControl(self.triton_settings.grpc_address)
        repository = ModelRepository(self.triton_settings.model_repository)
        cache = PackageCache.from_settings(self.settings)
        pipeline = LoadPipeline(self.settings, registry, cache, repository, triton)
        # The embedded Triton's backend processes run on this host, where their memory can be read.
        processes = BackendProcesses(repository.root) if self.triton_settings.embedded else None
        metrics_url = (
            self.settings.triton_metrics_url or f"http://127.0.0.1:{self.triton_settings.metrics_port}/metrics"
        )
        memory = MemoryManager(self.settings, repository, processes=processes, gpus=GpuMemoryReader(metrics_url))
        self.handler = LoaderHandler(self.settings, registry, pipeline, triton, repository, memory)
        self.server.add_servicer(
            loader_service_pb2_grpc.add_LoaderServiceServicer_to_server, LoaderServicer(self.handler), SERVICE_FULL_NAME
        )
        self.port = await self.server.start()
        self.handler.start_background()

    async def stop(self) -> None:
        await self.server.stop()
        if self.handler is not None:
            await self.handler.stop_background()
            await self.handler.registry.close()
            await self.handler.triton.close()
