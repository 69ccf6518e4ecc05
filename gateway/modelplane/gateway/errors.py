"""The one place where errors become HTTP responses: OpenAI's `{"error": {...}}` shape, the
right status, Retry-After where retrying helps, and never a stack trace."""

from __future__ import annotations

import math

import grpc
import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelplane.common.errors import ModelplaneError
from modelplane.common.grpc_errors import RemoteError
from modelplane.common.request_context import current_request_id

log = structlog.get_logger()

# gRPC status → (HTTP status, OpenAI error type)
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    # The loader refusing a load for lack of memory is a temporary condition of the service.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "service_unavailable_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
}


def error_response(
    status: int, message: str, error_type: str, code: str, *, retry_after: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": error_type, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def remote_error_response(error: RemoteError) -> JSONResponse:
    status, error_type = _STATUS.get(error.code, (500, "internal_error"))
    if status >= 500 and error.code not in _STATUS:
        log.error("upstream failed", code=error.code.name, error=error.message)
        message = f"Internal error (request id {current_request_id.get()}); the service logs have the details."
        return error_response(500, message, "internal_error", "internal_error")
    retry_after = error.retry_after_seconds
    if status == 503 and retry_after is None:
        retry_after = 2.0
    code = (error.reason or error.code.name).lower()
    log.info("request refused", status=status, code=code, error=error.message)
    return error_response(status, error.message, error_type, code, retry_after=retry_after)


async def handle_modelplane_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ModelplaneError)
    return remote_error_response(
        RemoteError(error.code, error.message, error.reason, error.metadata, error.retry_after_seconds)
    )


async def handle_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    message = f"Invalid request body at '{where}': {first.get('msg', 'malformed')}."
    return error_response(422, message, "invalid_request_error", "invalid_body")


async def handle_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code, "http_error")
    return error_response(error.status_code, str(error.detail), "invalid_request_error", code)


async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("request crashed")
    message = f"Internal error (request id {current_request_id.get()}); the gateway log has the details."
    return error_response(500, message, "internal_error", "internal_error")
