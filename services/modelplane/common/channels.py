"""gRPC client channels between services, configured the same way everywhere."""

from __future__ import annotations

import grpc

from modelplane.common.grpc_server import message_size_options

# Keepalives find a dead peer (a killed pod, a dropped connection) in seconds rather than at the
# TCP timeout, so streams such as WatchModels reconnect promptly.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(address: str, *, max_message_bytes: int = 64 * 1024 * 1024) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[*message_size_options(max_message_bytes), *_KEEPALIVE])
