"""Settings of the HTTP gateway (env prefix MODELPLANE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_GATEWAY_", use_attribute_docstrings=True, extra="ignore")

    host: str = "0.0.0.0"  # noqa: S104 - the gateway is what Dify connects to
    """Interface to listen on."""
    port: int = 8080
    """TCP port of the HTTP API (the base URL given to Dify is http://host:port/v1)."""
    inference_address: str = "localhost:50053"
    """host:port of the inference service."""
    registry_address: str = "localhost:50051"
    """host:port of the registry service."""
    request_timeout_seconds: float = 300.0
    """Deadline of one request, counted from its arrival and passed on to every gRPC call it makes
    (it includes waiting for an on-demand model load). Past it the client gets 504."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, how long requests in flight may finish."""
    keep_alive_seconds: int = 75
    """How long an idle client connection stays open. Longer than the clients' own idle limit
    (httpx, which Dify uses, keeps 5 s; load balancers 60 s): when both are equal, a client
    reuses a connection at the moment the server closes it and the request fails unanswered."""
    tls_cert_file: Path | None = None
    """PEM certificate (with its chain) to serve HTTPS with; unset serves plain HTTP. Dify must
    trust its issuer."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    api_keys: SecretStr | None = None
    """Comma-separated API keys clients must send as `Authorization: Bearer <key>`. Each entry is a
    key itself or `sha256:<hex digest of the key>`, so the plain key need not be written down at all.
    Only digests are kept in memory. With neither this nor `api_keys_file`, every request is
    accepted, whatever its Authorization header (Dify sends an empty one, or `Bearer None`)."""
    api_keys_file: Path | None = None
    """A TOML file of API keys with optional per-key model allow-lists and rate limits (format in
    gateway/README.md). Read at start; keys from it and from `api_keys` are both accepted."""
    rate_limit_per_minute: int = 0
    """Requests per minute each API key (or, with no keys configured, all callers together) may
    make; a key in the keys file may set its own. 0 means no limit. Past it clients get 429 with
    Retry-After. Counted per gateway process: with N replicas a key gets up to N times this."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body accepted; a larger one gets 413 before it is read."""
    max_batch_inputs: int = 16384
    """Most texts (or token-id lists) one embeddings request and most documents one rerank request
    may carry; more gets 400."""
    inference_batch_inputs: int = 512
    """Inputs per call to the inference service: larger batches are split into calls of this size,
    sent concurrently and joined in order. Keep it at or below MODELPLANE_INFERENCE_MAX_INPUTS_PER_REQUEST."""
    inference_concurrency: int = 4
    """Calls of one split batch in flight at once."""
    embed_calls_in_flight: int = 2
    """Most embedding calls per model at a time for small requests (up to `embed_coalesce_inputs`
    texts). Small requests that arrive while calls are running go to the inference service
    together, which saves each its own call's cost; a call beside one under way starts only once it
    is as big as that one, so the inference service has the next call ready when the last returns
    (docs/BATCHING.md measures 1 against 2). With N inference replicas behind one address, 2 × N;
    0 sends every request as its own call."""
    embed_coalesce_inputs: int = 32
    """Requests of up to this many texts are coalesced; larger ones are sent as they come."""
    inference_streams: bool = True
    """Embed and Rerank calls go to the inference service as messages of one long-lived stream per
    model, which saves each call its set-up (docs/BATCHING.md); false sends each as a unary call.
    An inference service without streams gets unary calls either way."""
    direct_routes: bool = True
    """Serve POST /v1/embeddings outside FastAPI's routing (gateway/direct.py), which halves the
    gateway's CPU per request (benchmarks/bench_gateway_overhead.py). The answers are the same
    either way; false routes it through FastAPI like every other path."""
    max_tokens_limit: int = 8192
    """Largest `max_tokens` a completion request may ask for; larger values are lowered to it (the
    inference service lowers them further to what fits in the model's context)."""
