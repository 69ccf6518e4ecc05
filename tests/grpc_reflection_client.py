"""What `grpcurl list` and `grpcurl describe` do, through the reflection service."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def list_services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def describe_methods(address: str, service: str) -> dict[str, tuple[str, str, bool]]:
    """method name → (input type, output type, server streaming), from the service's descriptor."""
    with grpc.insecure_channel(address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        descriptor = pool.FindServiceByName(service)
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in descriptor.methods
        }
