"""Rich gRPC error statuses: google.rpc.ErrorInfo and RetryInfo on the wire, in both directions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelplane.common.errors import ERROR_DOMAIN, ModelplaneError, Unavailable, error_for_code

_DETAILS_KEY = "grpc-status-details-bin"
log = structlog.get_logger()
# What gRPC's transport says when it cannot reach a peer: it names the peer's address.
_NAMES_AN_ADDRESS = re.compile(
    r"ipv[46]:|unix:|\d{1,3}(\.\d{1,3}){3}:\d+|failed to connect|connection refused|socket closed|dns resolution",
    re.IGNORECASE,
)


def to_status(error: ModelplaneError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(info)
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


@dataclass(frozen=True)
class RemoteError:
    """What a client learns from a failed call: code, message, reason and retry delay."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_seconds: float | None = None


def parse_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> RemoteError:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    reason, metadata, retry_after = "", {}, None
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return RemoteError(code or grpc.StatusCode.UNKNOWN, message or "", reason, metadata, retry_after)


def to_modelplane_error(error: grpc.aio.AioRpcError | grpc.RpcError, *, peer: str = "") -> ModelplaneError:
    """Turns a failed call to another service into this service's error, keeping code, reason,
    message and retry delay, so a caller further up sees what the service that failed said."""
    remote = parse_rpc_error(error)
    if remote.code == grpc.StatusCode.UNAVAILABLE and not remote.reason:
        # The peer is unreachable, or answered UNAVAILABLE without saying why: say which peer.
        # gRPC's own words for a failed connection name internal addresses ("ipv4:10.0.3.7:50053:
        # connection refused"); those go to the log, not to a caller outside the network.
        log.warning("peer unavailable", peer=peer or "upstream", detail=remote.message)
        message = remote.message or ""
        said = f" ({message})" if message and not _NAMES_AN_ADDRESS.search(message) else ""
        return Unavailable(
            f"The {peer or 'upstream'} service is unavailable{said}; retry shortly.",
            retry_after_seconds=remote.retry_after_seconds or 1.0,
            reason=f"{peer.upper()}_UNAVAILABLE" if peer else "UPSTREAM_UNAVAILABLE",
        )
    return error_for_code(remote.code)(
        remote.message,
        metadata=remote.metadata,
        retry_after_seconds=remote.retry_after_seconds,
        reason=remote.reason or None,
    )
