"""The real embedded stack, started once per test session exactly as `make run` starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

STARTUP_SECONDS = 600


@dataclass(frozen=True)
class RunningStack:
    home: Path
    log: Path
    gateway_url: str
    registry: str
    loader: str
    inference: str
    triton_metrics_url: str
    triton_grpc: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("modelplane-home")
    ports = {name: free_port() for name in ("registry", "loader", "inference", "gateway", "grpc", "http", "metrics")}
    env = {
        **os.environ,
        "MODELPLANE_HOME": str(home),
        "MODELPLANE_LOG_FORMAT": "json",
        "MODELPLANE_REGISTRY_PORT": str(ports["registry"]),
        "MODELPLANE_LOADER_PORT": str(ports["loader"]),
        "MODELPLANE_INFERENCE_PORT": str(ports["inference"]),
        "MODELPLANE_GATEWAY_PORT": str(ports["gateway"]),
        "MODELPLANE_GATEWAY_HOST": "127.0.0.1",
        "MODELPLANE_TRITON_GRPC_ADDRESS": f"127.0.0.1:{ports['grpc']}",
        "MODELPLANE_TRITON_HTTP_PORT": str(ports["http"]),
        "MODELPLANE_TRITON_METRICS_PORT": str(ports["metrics"]),
    }
    log = home / "stack.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelplane.cli", "up"], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    running = RunningStack(
        home=home,
        log=log,
        gateway_url=f"http://127.0.0.1:{ports['gateway']}",
        registry=f"127.0.0.1:{ports['registry']}",
        loader=f"127.0.0.1:{ports['loader']}",
        inference=f"127.0.0.1:{ports['inference']}",
        triton_metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
        triton_grpc=f"127.0.0.1:{ports['grpc']}",
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while "modelplane is up." not in running.log_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the stack did not come up:\n{running.log_text()[-5000:]}")
            time.sleep(0.5)
        assert httpx.get(f"{running.gateway_url}/readyz", timeout=5).status_code == 200
        yield running
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
