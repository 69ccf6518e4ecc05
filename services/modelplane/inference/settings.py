"""Settings of the inference service (env prefix MODELPLANE_INFERENCE_)."""

from __future__ import annotations

from typing import Literal

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
    encoder_calls_in_flight: int = 1
    """Most Triton calls at a time per embedding or rerank model. Requests that arrive while that
    many are running go to Triton together in the next call, which saves each its own call's cost
    (docs/BATCHING.md). With several Triton instances of the model (`instance_count`), set it to
    their number; 0 sends every request as its own call."""
