"""gRPC clients of Triton (KServe v2), plain or under TLS as TritonSettings say.

The inference service (one client per node) and the loader (its own node's Triton) open them the
same way, so a Triton behind TLS is reached by both or by neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.grpc import aio as triton_aio

from modelplane.common.settings import TritonSettings


class TritonTlsError(ValueError):
    """The Triton TLS settings are incomplete or name files that cannot be read."""


@dataclass(frozen=True)
class TritonTls:
    """The files a Triton client presents and trusts, read once."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = ""

    @classmethod
    def from_settings(cls, settings: TritonSettings) -> TritonTls | None:
        """None when no Triton TLS file is set; refuses half a configuration with what to set."""
        given = {
            "MODELPLANE_TRITON_TLS_CA_FILE": settings.tls_ca_file,
            "MODELPLANE_TRITON_TLS_CERT_FILE": settings.tls_cert_file,
            "MODELPLANE_TRITON_TLS_KEY_FILE": settings.tls_key_file,
        }
        if not any(given.values()):
            return None
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise TritonTlsError(
                f"TLS to Triton is half configured: {', '.join(missing)} not set. Set all three, or none to reach "
                "Triton without TLS."
            )
        return cls(*(_read(name, path) for name, path in given.items()), server_name=settings.tls_server_name)  # type: ignore[arg-type]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TritonTlsError(
            f"{setting} names {path}, which cannot be read ({error.strerror}); fix the path."
        ) from None


def open_triton(address: str, tls: TritonTls | None = None) -> triton_aio.InferenceServerClient:
    """A client of the Triton at `address`, under TLS when `tls` is given."""
    if tls is None:
        return triton_aio.InferenceServerClient(address)
    if not tls.server_name:
        return triton_aio.InferenceServerClient(address, creds=tls.credentials())
    # Any channel argument replaces all of tritonclient's defaults, so they are restated here.
    keepalive = KeepAliveOptions()
    options = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.ssl_target_name_override", tls.server_name),
    ]
    return triton_aio.InferenceServerClient(address, creds=tls.credentials(), channel_args=options)
