"""Settings of the inference service (env prefix MODELPLANE_INFERENCE_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.common.settings import ServerSettings


class InferenceSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_INFERENCE_", use_attribute_docstrings=True, extra="ignore")

    port: int = 50053
    """TCP port of the inference gRPC API."""
    registry_address: str = "localhost:50051"
    """host:port of the registry service."""
    loader_address: str = "localhost:50052"
    """host:port of the loader service, asked for models that are registered but not loaded."""
    load_wait_seconds: float = 120.0
    """Longest a request waits for its model to load when the request itself sets no deadline."""
    max_inputs_per_request: int = 2048
    """Most texts one embedding or rerank request may carry."""
    truncation: Literal["truncate", "error"] = "truncate"
    """What to do with inputs longer than the model accepts when the request does not say."""
    stats_report_interval_seconds: float = 2.0
    """How often request counts are sent to the registry (they drive idle expiry and preloading)."""
    batching: bool = True
    """Batch encoder calls (embeddings, rerank) across concurrent requests (docs/BATCHING.md); false
    sends each request to Triton on its own, padded to its own longest input."""
    batch_max_size: int = Field(default=64, ge=1)
    """Most sequences in one batch sent to Triton; the model's own max batch size caps it too."""
    batch_max_queue_delay_ms: float = Field(default=2.0, ge=0)
    """Longest a sequence waits for a fuller batch while earlier batches are still running. A
    request that finds the model idle is sent at once, whatever this says."""
    batch_max_in_flight: int = Field(default=1, ge=1)
    """Batches per model sent to Triton and not yet answered; more lets the next batch queue in
    Triton while one runs (useful with several model instances or a GPU)."""
    batch_length_buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    """Sequence-length bucket bounds, in tokens: one batch holds sequences of one bucket only, padded
    to its own longest, so short texts do not pay for long ones. Longer sequences share one last
    bucket. A JSON list in the environment, e.g. `[16, 32, 64, 128, 256]`."""
