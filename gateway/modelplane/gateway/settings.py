"""Settings of the HTTP gateway (env prefix MODELPLANE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

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
    """Deadline of one request, passed on to the gRPC calls it makes (it includes waiting for an
    on-demand model load)."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, how long requests in flight may finish."""
    tls_cert_file: Path | None = None
    """PEM certificate (with its chain) to serve HTTPS with; unset serves plain HTTP. Dify must
    trust its issuer."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""
