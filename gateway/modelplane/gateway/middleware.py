"""Request ids and one access-log line per request, as a pure ASGI middleware (streaming-safe)."""

from __future__ import annotations

import time

import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelplane.common.request_context import REQUEST_ID_HEADER, accept_request_id, current_request_id

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
    """Every request body of this API is JSON. `curl -d` labels bodies as form data and some
    clients send no type at all, so anything not labelled JSON is read as JSON."""
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    declared = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if declared.split(b";")[0].strip().lower().endswith((b"/json", b"+json")):
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
            structlog.contextvars.unbind_contextvars("request_id", "model")
