"""Every gRPC service answers `grpcurl list` and `grpcurl describe` (server reflection)."""

from __future__ import annotations

import pytest

from tests.grpc_reflection_client import describe_methods, list_services
from tests.integration.conftest import RunningStack

SERVICES = {
    "registry": ("modelplane.registry.v1.RegistryService", "GetModel"),
    "loader": ("modelplane.loader.v1.LoaderService", "LoadModel"),
    "inference": ("modelplane.inference.v1.InferenceService", "Embed"),
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_list_and_describe(stack: RunningStack, service: str) -> None:
    address = getattr(stack, service)
    full_name, method = SERVICES[service]
    assert {full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        list_services(address)
    )
    assert method in describe_methods(address, full_name)
