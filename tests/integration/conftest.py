"""The real embedded stack, started once per test session exactly as `make run` starts it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    # Prometheus endpoints by process: registry, loader, inference, gateway, triton.
    metrics: dict[str, str] = field(default_factory=dict)
    # How an HTTP client verifies the gateway: the CA of its certificate when it serves HTTPS.
    verify: ssl.SSLContext | bool = True
    # The `modelplane up` supervisor: every service and Triton are in its process tree.
    pid: int = 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("modelplane-home")) as running:
        yield running


@contextlib.contextmanager
def running_stack(
    home: Path, *, extra_env: dict[str, str] | None = None, bundled: bool = True, own_session: bool = False
) -> Iterator[RunningStack]:
    """`modelplane up` on free ports, its output (every service's log) in home/stack.log. With
    `own_session` it leads a process group of its own, which a test may signal as a terminal does."""
    names = ("registry", "loader", "inference", "gateway", "grpc", "http", "metrics")
    ports = {name: free_port() for name in names}
    metrics_ports = {name: free_port() for name in ("registry", "loader", "inference")}
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
        **{f"MODELPLANE_{name.upper()}_METRICS_PORT": str(port) for name, port in metrics_ports.items()},
        **(extra_env or {}),
    }
    scheme = "http"
    verify: ssl.SSLContext | bool = True
    if "MODELPLANE_GATEWAY_TLS_CERT_FILE" in env:
        scheme = "https"
        verify = ssl.create_default_context(cafile=Path(env["MODELPLANE_TLS_DIR"]) / "ca.crt")
    log = home / "stack.log"
    command = [sys.executable, "-m", "modelplane.cli", "up", *([] if bundled else ["--no-bundled"])]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=own_session
        )
    running = RunningStack(
        home=home,
        log=log,
        gateway_url=f"{scheme}://127.0.0.1:{ports['gateway']}",
        registry=f"127.0.0.1:{ports['registry']}",
        loader=f"127.0.0.1:{ports['loader']}",
        inference=f"127.0.0.1:{ports['inference']}",
        triton_metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
        triton_grpc=f"127.0.0.1:{ports['grpc']}",
        metrics={
            **{name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()},
            "gateway": f"{scheme}://127.0.0.1:{ports['gateway']}/metrics",
            "triton": f"http://127.0.0.1:{ports['metrics']}/metrics",
        },
        verify=verify,
        pid=process.pid,
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while "modelplane is up." not in running.log_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the stack did not come up:\n{running.log_text()[-5000:]}")
            time.sleep(0.5)
        # What a script waiting for `make run` does: /readyz answers 200 once every model the stack
        # must serve (the bundled ones) is READY.
        readyz = f"{running.gateway_url}/readyz"
        while (ready := httpx.get(readyz, timeout=5, verify=running.verify)).status_code != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the stack was up but never ready: {ready.text}\n{running.log_text()[-5000:]}")
            time.sleep(0.5)
        yield running
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


CROSS_ENCODER = "tiny-cross-encoder"


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A cross-encoder of a real architecture (BERT for sequence classification, one label) with
    random weights, saved as a user saves one, with MiniLM's tokenizer (same vocabulary)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=1,
        # Wider than BERT's 0.02, so that random documents get clearly different scores.
        initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("models") / CROSS_ENCODER
    BertForSequenceClassification(config).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path / name, path / name)
    return path


@pytest.fixture(scope="session")
async def cross_encoder(stack: RunningStack, cross_encoder_path: Path) -> str:
    """The test cross-encoder registered as a rerank model and loaded in the running stack."""
    from modelplane.common.types import ModelSpec, Task
    from modelplane.loader.client import LoaderClient
    from modelplane.registry.client import RegistryClient

    spec = ModelSpec(name=CROSS_ENCODER, task=Task.RERANK, source_uri=str(cross_encoder_path))
    async with RegistryClient(stack.registry) as registry:
        await registry.register(spec)
    async with LoaderClient(stack.loader) as loader:
        await loader.ensure_loaded(CROSS_ENCODER, reason="test", timeout_seconds=300)
    return CROSS_ENCODER


@pytest.fixture(scope="session")
def dify_python() -> Path:
    requirements = Path(__file__).parent / "dify" / "requirements.txt"
    version = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelplane" / f"dify-env-{version}"
    python = cache / "bin" / "python"
    if not (cache / ".complete").exists():
        shutil.rmtree(cache, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True, timeout=120)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if installed.returncode != 0:
            pytest.fail(f"could not install Dify's provider code (dify-plugin):\n{installed.stderr[-3000:]}")
        (cache / ".complete").touch()
    return python
