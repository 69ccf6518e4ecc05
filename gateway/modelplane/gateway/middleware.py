"""What happens to every request before a route sees it, as pure ASGI middleware (streaming-safe,
and run in the request's own task, so the context variables they set reach the route):

- `RequestContextMiddleware` (outermost): the request id, one access-log line, HTTP metrics.
- `AccessMiddleware`: for every path but the probes, metrics and API docs, the body size limit
  (413), the API key (401), the caller's request rate (429) and the request's deadline. A route
  gets all of it by being mounted on the app; it need not declare anything.
"""

from __future__ import annotations

import time

import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelplane.common.request_context import REQUEST_ID_HEADER, accept_request_id, current_request_id
from modelplane.gateway import errors
from modelplane.gateway.auth import Caller, KeyRing, current_caller
from modelplane.gateway.limits import RateLimiter, request_deadline

log = structlog.get_logger()

HTTP_REQUESTS = Counter("modelplane_http_requests_total", "HTTP requests, by route and status.", ["route", "status"])
HTTP_LATENCY = Histogram(
    "modelplane_http_request_duration_seconds",
    "Time from a request's arrival to its last byte.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_JSON = b"application/json"


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Every request body of this API is JSON but an audio upload's (multipart, as OpenAI's
    transcription API takes it). `curl -d` labels bodies as form data and some clients send no
    type at all, so anything not labelled JSON or multipart is read as JSON."""
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    declared = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    media_type = declared.split(b";")[0].strip().lower()
    if media_type.endswith((b"/json", b"+json")) or media_type == b"multipart/form-data":
        return headers
    return [*kept, (b"content-type", _JSON)]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            scope["headers"] = _json_content_type(scope["headers"])
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        request_id = accept_request_id(headers.get(REQUEST_ID_HEADER))
        current_request_id.set(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(route_path, str(status)).inc()
            HTTP_LATENCY.labels(route_path).observe(elapsed)
            if scope["path"] not in _QUIET_PATHS:
                log.info(
                    "http",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
            structlog.contextvars.unbind_contextvars("request_id", "model", "caller")


# Open to everyone: orchestrator probes, Prometheus, and the API's own description.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    value = next((v for k, v in headers if k.lower() == b"content-length"), None)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class AccessMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        rate_limiter: RateLimiter,
        max_body_bytes: int,
        request_timeout_seconds: float,
    ) -> None:
        self.app = app
        self.keys = keys
        self.rate_limiter = rate_limiter
        self.max_body_bytes = max_body_bytes
        self.timeout = request_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            caller = self._admit(scope)
        except errors.GatewayError as error:
            await errors.gateway_error_response(error)(scope, receive, send)
            return
        caller_token = current_caller.set(caller)
        deadline_token = request_deadline.set(time.monotonic() + self.timeout)
        # Unbound by RequestContextMiddleware, after its access-log line.
        structlog.contextvars.bind_contextvars(caller=caller.name)
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            request_deadline.reset(deadline_token)
            current_caller.reset(caller_token)

    def _admit(self, scope: Scope) -> Caller:
        """The request's caller, once its size, key and rate are acceptable."""
        length = _content_length(scope["headers"])
        if length is not None and length > self.max_body_bytes:
            raise errors.body_too_large(self.max_body_bytes)
        authorization = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        caller = self.keys.authenticate(authorization.decode("latin-1"))
        wait = self.rate_limiter.acquire(caller.name, caller.requests_per_minute)
        if wait is not None:
            raise errors.RateLimited(
                f"API key '{caller.name}' is over its limit of {caller.requests_per_minute} requests per minute; "
                f"retry in {wait:.1f} s.",
                retry_after_seconds=wait,
            )
        return caller

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a body without Content-Length (chunked) once it passes the limit."""
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise errors.BodyTooLarge(self.max_body_bytes)
            return message

        return receive_within_limit
