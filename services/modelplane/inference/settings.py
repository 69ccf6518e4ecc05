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
    max_audio_seconds: float = 1800.0
    """Longest recording one transcription request may carry, in seconds (30 minutes); longer ones
    are refused with INVALID_ARGUMENT. With the gateway's 32 MiB body limit that is about a
    128 kbit/s MP3 of that length."""
    transcribe_chunk_seconds: float = 120.0
    """Long recordings go to the speech-to-text model in chunks of at most this many seconds, each
    cut at a pause and prompted with the end of the chunk before it."""
    max_speech_input_chars: int = 10000
    """Most characters one text-to-speech request may speak."""
