"""Settings of the loader service (env prefix MODELPLANE_LOADER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.common.settings import ServerSettings, modelplane_home
from modelplane.common.types import RuntimeTarget


class LoaderSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_LOADER_", use_attribute_docstrings=True, extra="ignore")

    port: int = 50052
    """TCP port of the loader's gRPC API."""
    registry_address: str = "localhost:50051"
    """host:port of the registry service."""
    cache_dir: Path = Field(default_factory=lambda: modelplane_home() / "cache")
    """The local (hot) cache: verified packages and converted artifacts, content-addressed."""
    default_target: RuntimeTarget = RuntimeTarget.EMBEDDED
    """Which Triton the repository entries are written for when a model's hints do not say."""
    load_timeout_seconds: float = 900.0
    """Longest time one whole load (fetch to READY) may take."""
    triton_load_timeout_seconds: float = 300.0
    """Longest time Triton may take to load one model."""
    max_concurrent_loads: int = 2
    """Loads (fetch, convert or Triton load) that run at the same time; more wait their turn."""
    parity_tolerance: float = 1e-4
    """Largest absolute difference allowed between a converted model's outputs and PyTorch's."""
    max_batch_size: int = 64
    """Default largest batch Triton forms for an encoder model."""
    max_queue_delay_microseconds: int = 2000
    """Default time a request may wait in Triton's queue for a batch to fill."""
    onnx_intra_op_threads: int = 0
    """Threads onnxruntime uses inside one inference on the embedded Triton; 0 means all cores."""
    reconcile_interval_seconds: float = 30.0
    """How often the loader compares the registry with Triton and converges them."""
