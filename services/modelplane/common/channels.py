"""gRPC client channels between services, configured the same way everywhere: mTLS when this
process has certificates (common/tls.py), keepalives, and message size limits."""

from __future__ import annotations

import grpc

from modelplane.common.grpc_server import message_size_options
from modelplane.common.tls import TlsFiles, process_tls

# Keepalives find a dead peer (a killed pod, a dropped connection) in seconds rather than at the
# TCP timeout, so streams such as WatchModels reconnect promptly.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# After a peer restarts, a channel tries again on an exponential backoff that gRPC caps at
# 120 s by default: callers would get 503 for minutes from a service back in seconds.
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 2_000)]


def open_channel(
    address: str, *, max_message_bytes: int = 64 * 1024 * 1024, tls: TlsFiles | None = None
) -> grpc.aio.Channel:
    """A channel to another modelplane service; `tls` defaults to this process's certificates."""
    options = [*message_size_options(max_message_bytes), *_KEEPALIVE, *_RECONNECT]
    tls = tls or process_tls()
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
