"""Extra service processes beside the running stack, configured differently from it (API keys, a
tiny deadline, truncation as an error), started as production starts them: `modelplane serve`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.integration.conftest import RunningStack

STARTUP_SECONDS = 60


@contextlib.contextmanager
def _serve(name: str, env: dict[str, str], log: Path, ready: Callable[[], bool]) -> Iterator[None]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelplane.cli", "serve", name],
            env={**os.environ, "MODELPLANE_LOG_FORMAT": "json", **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serve_gateway(stack: RunningStack, inference: str | None = None, **settings: object) -> Iterator[str]:
    """A gateway in front of the stack's services (or another inference service); yields its URL.
    `settings` are GatewaySettings fields, e.g. api_keys_file=..., request_timeout_seconds=0.05."""
    port = free_port()
    env = {
        "MODELPLANE_GATEWAY_HOST": "127.0.0.1",
        "MODELPLANE_GATEWAY_PORT": str(port),
        "MODELPLANE_GATEWAY_INFERENCE_ADDRESS": inference or stack.inference,
        "MODELPLANE_GATEWAY_REGISTRY_ADDRESS": stack.registry,
        **{f"MODELPLANE_GATEWAY_{key.upper()}": str(value) for key, value in settings.items()},
    }
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        return False

    with _serve("gateway", env, stack.home / f"gateway-{port}.log", ready):
        yield url


@contextlib.contextmanager
def serve_inference(stack: RunningStack, **settings: object) -> Iterator[str]:
    """An inference service on the stack's registry, loader and Triton; yields its address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        "MODELPLANE_INFERENCE_HOST": "127.0.0.1",
        "MODELPLANE_INFERENCE_PORT": str(port),
        "MODELPLANE_INFERENCE_REGISTRY_ADDRESS": stack.registry,
        "MODELPLANE_INFERENCE_LOADER_ADDRESS": stack.loader,
        "MODELPLANE_TRITON_GRPC_ADDRESS": stack.triton_grpc,
        **{f"MODELPLANE_INFERENCE_{key.upper()}": str(value) for key, value in settings.items()},
    }

    with _serve("inference", env, stack.home / f"inference-{port}.log", lambda: grpc_serving(address)):
        yield address


def grpc_serving(address: str) -> bool:
    """Whether the gRPC service at `address` answers its health check with SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING
