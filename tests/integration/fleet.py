"""A fleet on this machine for the fleet's integration tests: one registry and several nodes, each
a real tritonserver and a real loader (`modelplane serve loader`, as production runs them), every
process on its own ports with its own Triton repository and cache. A node can be SIGKILLed (Triton
and loader together) and started again, which `modelplane up` cannot do: it restarts what dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.settings import TritonSettings
from modelplane.triton.embedded import EmbeddedTriton
from tests.conftest import free_port

STARTUP_SECONDS = 120
LEASE_SECONDS = 10.0


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def _wait(what: str, ready: object, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready():  # type: ignore[operator]
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (status {process.poll()}):\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path, size: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-size:]
    return "(no log)"


def _stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class FleetNode:
    node_id: str
    home: Path
    registry: str
    env: dict[str, str]
    triton: TritonSettings = field(init=False)
    loader_port: int = field(default_factory=free_port)
    loader_metrics_port: int = field(default_factory=free_port)
    triton_process: subprocess.Popen[bytes] | None = None
    loader_process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.triton = TritonSettings(
            grpc_address=f"127.0.0.1:{free_port()}",
            http_port=free_port(),
            metrics_port=free_port(),
            model_repository=self.home / "triton" / "models",
        )

    @property
    def loader(self) -> str:
        return f"127.0.0.1:{self.loader_port}"

    @property
    def loader_log(self) -> Path:
        return self.home / f"loader-{self.starts}.log"

    def loader_environment(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "MODELPLANE_HOME": str(self.home),
            "MODELPLANE_LOG_FORMAT": "json",
            "MODELPLANE_NODE_ID": self.node_id,
            "MODELPLANE_LOADER_FLEET": "true",
            "MODELPLANE_LOADER_HOST": "127.0.0.1",
            "MODELPLANE_LOADER_PORT": str(self.loader_port),
            "MODELPLANE_LOADER_METRICS_PORT": str(self.loader_metrics_port),
            "MODELPLANE_LOADER_REGISTRY_ADDRESS": self.registry,
            "MODELPLANE_LOADER_CACHE_DIR": str(self.home / "cache"),
            "MODELPLANE_LOADER_NODE_LEASE_SECONDS": str(LEASE_SECONDS),
            "MODELPLANE_LOADER_PRELOAD": "false",
            "MODELPLANE_LOADER_TRITON_METRICS_URL": f"http://127.0.0.1:{self.triton.metrics_port}/metrics",
            "MODELPLANE_TRITON_GRPC_ADDRESS": self.triton.grpc_address,
            "MODELPLANE_TRITON_HTTP_PORT": str(self.triton.http_port),
            "MODELPLANE_TRITON_METRICS_PORT": str(self.triton.metrics_port),
            "MODELPLANE_TRITON_MODEL_REPOSITORY": str(self.triton.model_repository),
            **self.env,
            **extra,
        }

    def start(self) -> None:
        """Starts this node's Triton, then its loader, and waits until the loader serves (it has
        registered the node by then)."""
        self.starts += 1
        self.home.mkdir(parents=True, exist_ok=True)
        self.triton.model_repository.mkdir(parents=True, exist_ok=True)
        triton = EmbeddedTriton(self.triton, workdir=self.home / "triton")
        triton_log = self.home / f"tritonserver-{self.starts}.log"
        with triton_log.open("wb") as output:
            self.triton_process = subprocess.Popen(
                triton.command(), env=triton.environment(), stdout=output, stderr=subprocess.STDOUT
            )
        live = f"http://127.0.0.1:{self.triton.http_port}/v2/health/live"

        def triton_live() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(live, timeout=1).status_code == 200
            return False

        _wait(f"tritonserver of {self.node_id}", triton_live, self.triton_process, triton_log)
        self.loader_process = self.spawn_loader(self.loader_log)
        _wait(f"loader of {self.node_id}", lambda: _serving(self.loader), self.loader_process, self.loader_log)

    def spawn_loader(self, log: Path, **extra: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            return subprocess.Popen(
                [sys.executable, "-m", "modelplane.cli", "serve", "loader"],
                env=self.loader_environment(**extra),
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL to Triton and the loader together, as a machine that loses power."""
        for process in (self.loader_process, self.triton_process):
            if process is not None and process.poll() is None:
                process.kill()
        for process in (self.loader_process, self.triton_process):
            if process is not None:
                process.wait()

    def stop(self) -> None:
        _stop(self.loader_process)
        _stop(self.triton_process)


@dataclass
class Fleet:
    home: Path
    registry: str
    nodes: dict[str, FleetNode]

    def log_tail(self) -> str:
        parts = [f"--- registry\n{_tail(self.home / 'registry.log')}"]
        for node in self.nodes.values():
            parts.append(f"--- {node.node_id} loader\n{_tail(node.loader_log)}")
        return "\n".join(parts)


@contextlib.contextmanager
def running_fleet(home: Path, count: int, *, database_url: str = "", **node_env: str) -> Iterator[Fleet]:
    """A registry and `count` nodes (node-0 …), each node with `node_env` on top of its settings."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    registry = f"127.0.0.1:{port}"
    log = home / "registry.log"
    env = {
        **os.environ,
        "MODELPLANE_HOME": str(home),
        "MODELPLANE_LOG_FORMAT": "json",
        "MODELPLANE_REGISTRY_HOST": "127.0.0.1",
        "MODELPLANE_REGISTRY_PORT": str(port),
        "MODELPLANE_REGISTRY_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{home / 'registry.db'}",
        # The tests place copies themselves (SetPlacements), as the placer would, so that what each
        # node must hold is known; the placer's own decisions are tested in tests/registry.
        "MODELPLANE_REGISTRY_PLACER": "false",
    }
    with log.open("wb") as output:
        registry_process = subprocess.Popen(
            [sys.executable, "-m", "modelplane.cli", "serve", "registry"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    nodes = {f"node-{i}": FleetNode(f"node-{i}", home / f"node-{i}", registry, dict(node_env)) for i in range(count)}
    try:
        _wait("registry", lambda: _serving(registry), registry_process, log)
        for node in nodes.values():
            node.start()
        yield Fleet(home, registry, nodes)
    finally:
        for node in nodes.values():
            node.stop()
        _stop(registry_process)
