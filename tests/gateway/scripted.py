"""A scripted inference service for the gateway's tests: a real gRPC server on a free port that
answers as the test's servicer says, for what the real stack cannot be made to do on demand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures

import grpc

from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import free_port


@contextlib.contextmanager
def serving(servicer: pb_grpc.InferenceServiceServicer) -> Iterator[str]:
    """`servicer` served on loopback; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address
    finally:
        server.stop(0)
