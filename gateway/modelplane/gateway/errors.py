"""The one place where errors become HTTP responses.

Every error a client sees has OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`,
the status that says what to do about it, and `Retry-After` where waiting helps:

| status | when | code (examples) |
| --- | --- | --- |
| 400 | the request is well-formed but cannot be served as asked | `too_many_inputs`, `input_too_long`, `wrong_task` |
| 401 | API keys are configured and the request has none, or a wrong one | `invalid_api_key` |
| 403 | the key may not use that model (its allow-list) | `model_not_allowed` |
| 404 | unknown model, or unknown path | `model_not_found`, `not_found` |
| 409 | the model is in a state from which it cannot serve (`state` says which) | `model_not_servable` |
| 413 | the body is larger than MODELPLANE_GATEWAY_MAX_BODY_BYTES | `request_too_large` |
| 422 | the body is not JSON, or not the JSON this endpoint takes | `invalid_body` |
| 429 | the key's request rate is exhausted (`Retry-After`) | `rate_limit_exceeded` |
| 503 | the model is loading, or a service or Triton is down (`Retry-After`) | `model_loading`, `triton_unavailable` |
| 504 | the request's deadline passed | `deadline_exceeded` |

Errors come from two places: the gRPC services, as a `ModelplaneError` carrying a status code and
a reason (mapped by `_GRPC_STATUS`), and the gateway itself, as a `GatewayError` carrying its HTTP
status. Every error response is logged here, with the request id the logging context carries. A
stack trace never reaches a client: anything unexpected becomes a 500 naming the request id.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

import grpc
import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelplane.common.errors import ModelplaneError
from modelplane.common.request_context import current_request_id

log = structlog.get_logger()


class GatewayError(Exception):
    """An error the gateway decides on itself, before or instead of calling a service."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "invalid_request_error"
    code: ClassVar[str] = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_seconds: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_seconds = retry_after_seconds
        self.headers = dict(headers or {})
        if code:
            self.code = code  # type: ignore[misc]


class BadRequest(GatewayError):
    pass


class Unauthenticated(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="modelplane"'})


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RequestTooLarge(GatewayError):
    status = 413
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BodyTooLarge(StarletteHTTPException):
    """Raised while a chunked body is being read, so FastAPI's body parsing passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=_too_large_message(limit))


def _too_large_message(limit: int) -> str:
    size = f"{limit / 2**20:.0f} MiB" if limit >= 2**20 else f"{limit} bytes"
    return (
        f"The request body is larger than the {size} this gateway accepts; send fewer or "
        "shorter inputs per request (or raise MODELPLANE_GATEWAY_MAX_BODY_BYTES)."
    )


def body_too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(_too_large_message(limit))


# gRPC status → (HTTP status, OpenAI error type). Codes absent here are internal failures: 500.
_GRPC_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
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
# When a service says a request may be retried but not when, clients wait this long.
_DEFAULT_RETRY_AFTER_SECONDS = 2.0


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    *,
    param: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> JSONResponse:
    """The response of every error, and its log line."""
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param, **(extra or {})}}
    if status >= 500:
        log.warning("request failed", status=status, code=code, error=message)
    else:
        log.info("request refused", status=status, code=code, error=message)
    return JSONResponse(body, status_code=status, headers=all_headers or None)


def _internal_error_response() -> JSONResponse:
    message = f"Internal error (request id {current_request_id.get()}); the service logs have the details."
    return error_response(500, message, "internal_error", "internal_error")


def gateway_error_response(error: GatewayError) -> JSONResponse:
    return error_response(
        error.status,
        error.message,
        error.type,
        error.code,
        param=error.param,
        retry_after=error.retry_after_seconds,
        headers=error.headers,
    )


def service_error_response(error: ModelplaneError) -> JSONResponse:
    """A service's refusal (or the gateway's own ModelplaneError), with the status its code maps to."""
    mapped = _GRPC_STATUS.get(error.code)
    if mapped is None:
        log.error("upstream failed", code=error.code.name, reason=error.reason, error=error.message)
        return _internal_error_response()
    status, error_type = mapped
    retry_after = error.retry_after_seconds
    if status == 503 and retry_after is None:
        retry_after = _DEFAULT_RETRY_AFTER_SECONDS
    # A model that cannot serve says which state it is in, for the admin who reads the error.
    extra = {"state": error.metadata["state"]} if status == 409 and "state" in error.metadata else None
    return error_response(
        status,
        error.message,
        error_type,
        error.reason.lower(),
        param=error.metadata.get("param"),
        retry_after=retry_after,
        extra=extra,
    )


def stream_error_chunk(error: Exception) -> dict[str, object]:
    """The chunk that ends an event stream when an error comes after the stream has started (its
    status line is already sent): the error object the same error would have had as a response."""
    if isinstance(error, GatewayError):
        response = gateway_error_response(error)
    elif isinstance(error, ModelplaneError):
        response = service_error_response(error)
    else:
        log.exception("stream crashed", exc_info=error)
        response = _internal_error_response()
    return json.loads(bytes(response.body))


async def handle_gateway_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, GatewayError)
    return gateway_error_response(error)


async def handle_modelplane_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ModelplaneError)
    return service_error_response(error)


# Pydantic names the branches of a union in an error's location; they mean nothing to a client.
_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_path(location: tuple[int | str, ...]) -> str:
    """'input.0' from pydantic's ('body', 'input', 'list[str]', 0)."""
    parts = location[1:] if location[:1] == ("body",) else location
    return ".".join(
        str(part) for part in parts if not (isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES))
    )


async def handle_validation_error(request: Request, error: Exception) -> JSONResponse:
    """422: the body is not JSON, or not the shape this endpoint takes."""
    assert isinstance(error, RequestValidationError)
    problems = error.errors()
    # Of a union's branches, the one that failed a constraint (not its type) is what the client meant.
    first = next((p for p in problems if not str(p.get("type")).endswith(("_type", "_parsing"))), None)
    first = first or (problems[0] if problems else {})
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed")
        message = f"The request body is not valid JSON ({detail} at character {first['loc'][-1]})."
        return error_response(422, message, "invalid_request_error", "invalid_body")
    path = _field_path(tuple(first.get("loc", ())))
    where = f"'{path}'" if path else "the top level"
    others = len({_field_path(tuple(p.get("loc", ()))) for p in problems} - {path})
    more = f" ({others} more field{'s' if others != 1 else ''} also invalid)" if others else ""
    message = f"Invalid request body at {where}: {first.get('msg', 'malformed')}{more}."
    return error_response(422, message, "invalid_request_error", "invalid_body", param=path or None)


def _known_paths(request: Request) -> str:
    return ", ".join(sorted(request.app.openapi().get("paths", {})))


async def handle_http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own errors: unknown path, wrong method, a chunked body over the limit."""
    assert isinstance(error, StarletteHTTPException)
    headers = dict(error.headers or {})
    if error.status_code == 404:
        message = f"There is no endpoint at '{request.url.path}'. This API serves {_known_paths(request)}."
        return error_response(404, message, "not_found_error", "not_found", headers=headers)
    if error.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        message = f"'{request.url.path}' does not take {request.method}; use {allowed or 'another method'}."
        return error_response(405, message, "invalid_request_error", "method_not_allowed", headers=headers)
    if error.status_code == 413:
        return error_response(413, str(error.detail), "invalid_request_error", "request_too_large")
    if error.status_code == 400 and isinstance(error.__cause__, (UnicodeDecodeError, RecursionError)):
        # FastAPI's "There was an error parsing the body" for what its JSON decoding cannot read.
        return error_response(422, _unparsable_body(error.__cause__), "invalid_request_error", "invalid_body")
    return error_response(error.status_code, str(error.detail), "invalid_request_error", "http_error", headers=headers)


def _unparsable_body(cause: Exception) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"The request body is not valid JSON: it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
            f"position {cause.start}). Send the body encoded as UTF-8."
        )
    return "The request body is not valid JSON that can be read: it is nested too deeply. Send a flatter body."


async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("request crashed")
    return _internal_error_response()
