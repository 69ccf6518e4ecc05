"""The root of every service's exception hierarchy.

A `ModelplaneError` carries the gRPC status code it maps to, a stable machine-readable reason
(sent as `google.rpc.ErrorInfo.reason`) and, for retryable conditions, a retry delay (sent as
`google.rpc.RetryInfo`). The server interceptor turns it into a rich gRPC status; the gateway turns
that status into an HTTP error in one place. Messages are written for the operator who reads them:
what went wrong and what to do.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

ERROR_DOMAIN = "modelplane.io"


class ModelplaneError(Exception):
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        retry_after_seconds: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds
        if reason:
            self.reason = reason


class InvalidArgument(ModelplaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(ModelplaneError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ModelNotFound(NotFound):
    reason = "MODEL_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"Model '{name}' is not registered. List the registered models with "
            "`modelplane models ls` (or GET /v1/models) and check the name.",
            metadata={"model": name},
        )


class FailedPrecondition(ModelplaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(ModelplaneError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class AlreadyExists(ModelplaneError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class ResourceExhausted(ModelplaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(ModelplaneError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(ModelplaneError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ModelplaneError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unimplemented(ModelplaneError):
    """What was asked is not part of this installation (an optional extra that is not installed)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(ModelplaneError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ModelplaneError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Aborted,
        AlreadyExists,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def error_for_code(code: grpc.StatusCode) -> type[ModelplaneError]:
    """The error class a remote status code maps back to; unknown codes become Internal."""
    return _BY_CODE.get(code, Internal)
