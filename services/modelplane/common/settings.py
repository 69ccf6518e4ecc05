"""Settings shared by every service; each service adds its own class with its own env prefix.

Every field has a docstring: it is the field's description in `modelplane config` and the
deployment docs. Paths default under MODELPLANE_HOME so one variable moves all state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def modelplane_home() -> Path:
    """Where modelplane keeps its state unless a setting says otherwise."""
    explicit = os.environ.get("MODELPLANE_HOME")
    if explicit:
        return Path(explicit).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "modelplane"


class LoggingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_LOG_", use_attribute_docstrings=True, extra="ignore")

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level of log line written."""
    format: Literal["auto", "json", "console"] = "auto"
    """`json` for log collectors, `console` for people; `auto` picks console on a terminal."""


class RuntimeSettings(BaseSettings):
    """How a service process runs, whichever service it is."""

    model_config = SettingsConfigDict(env_prefix="MODELPLANE_", use_attribute_docstrings=True, extra="ignore")

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The event loop a `modelplane serve` process runs on. uvloop spends less CPU on each request
    (docs/BATCHING.md measures it); `asyncio` is the standard library's, for debugging. The loader
    always runs on asyncio: it starts converter processes, which uvloop forks unsafely next to gRPC."""


class TlsSettings(BaseSettings):
    """Mutual TLS on every gRPC channel and port; off unless certificates are configured."""

    model_config = SettingsConfigDict(env_prefix="MODELPLANE_TLS_", use_attribute_docstrings=True, extra="ignore")

    dir: Path | None = None
    """A directory made by `modelplane certs init`: each process uses `ca.crt` and the
    `<service>.crt`/`<service>.key` of its own service (`cli` for the command line)."""
    ca_file: Path | None = None
    """PEM file of the CA that signs every modelplane certificate (overrides `dir`)."""
    cert_file: Path | None = None
    """PEM certificate this process presents, as server and as client (overrides `dir`)."""
    key_file: Path | None = None
    """PEM private key of `cert_file` (overrides `dir`)."""


class ServerSettings(BaseSettings):
    """What every gRPC service needs to listen; subclasses set the env prefix and port."""

    model_config = SettingsConfigDict(use_attribute_docstrings=True, extra="ignore")

    host: str = "0.0.0.0"  # noqa: S104 - services listen on every interface in containers
    """Interface to listen on."""
    port: int = 0
    """TCP port to listen on; 0 picks a free one (tests)."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, how long requests in flight may finish before they are cancelled."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    metrics_port: int = 0
    """Port of this service's Prometheus /metrics endpoint (plain HTTP); 0 serves none."""
    health_port: int = 0
    """A plaintext port that serves only the gRPC health service, for probes that cannot present a
    client certificate (the kubelet's) when mTLS is on; 0 serves none."""


class TritonSettings(BaseSettings):
    """Where Triton is and, for the embedded one, how to start it."""

    model_config = SettingsConfigDict(env_prefix="MODELPLANE_TRITON_", use_attribute_docstrings=True, extra="ignore")

    embedded: bool = True
    """Start the tritonserver binary of the nvidia-pytriton wheel (`modelplane up`); false when an
    external Triton (NVIDIA's container) serves at `grpc_address`."""
    grpc_address: str = "localhost:8001"
    """host:port of Triton's KServe v2 gRPC endpoint."""
    http_port: int = 8000
    """HTTP port of the embedded Triton."""
    metrics_port: int = 8002
    """Prometheus metrics port of the embedded Triton."""
    model_repository: Path = Field(default_factory=lambda: modelplane_home() / "triton" / "models")
    """Triton's model repository: the loader writes it, Triton reads it."""
    startup_timeout_seconds: float = 120.0
    """How long the embedded Triton may take to become live."""
    log_verbose: int = 0
    """Triton's --log-verbose level."""
    restart_backoff_max_seconds: float = 30.0
    """Longest wait between restarts of an embedded Triton that keeps dying."""
    tls_ca_file: Path | None = None
    """PEM file of the CA that signed Triton's gRPC server certificate. Set (with `tls_cert_file`
    and `tls_key_file`) to reach Triton over TLS: NVIDIA's container started with `--grpc-use-ssl`
    (and `--grpc-use-ssl-mutual`). The embedded Triton then serves its gRPC port with TLS too,
    presenting `tls_cert_file`, and accepts only clients whose certificate this CA signed."""
    tls_cert_file: Path | None = None
    """PEM certificate the inference service and the loader present to Triton (mutual TLS)."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""
    tls_server_name: str = ""
    """The name Triton's certificate must carry when it is not the host of the address dialled
    (each node's address comes from the registry); empty checks the host dialled."""
