"""The hot POST routes, served without FastAPI's per-request machinery.

Dify sends one text per embedding request and a knowledge-base import sends them by the thousand, so
the gateway's own cost per request is a large part of what each text costs. FastAPI's routing (it
walks its included routers on every request), dependency solving and exception middleware were
almost half of it: 248 against 136 µs of CPU per request at 16 concurrent single-text clients
(benchmarks/bench_gateway_overhead.py, docs/BATCHING.md section 6). `DirectRoutes` sits inside the
access middleware, so a request it serves has been authenticated, rate-limited, given its deadline
and logged like any other. For a POST to one of its paths whose body is a JSON object that validates
against the route's body model, it calls the route's FastAPI endpoint itself and answers with the
`Response` the endpoint returns; everything else — another path or method, a body that is not JSON
or not valid — goes on to FastAPI, with the body it has read, and gets FastAPI's own handling and
error messages. Errors the endpoint raises are answered by the application's exception handlers, as
FastAPI would.

A route served here stays declared on its FastAPI router (the OpenAPI document lists it) and must
take `(body, request)` and return a `Response`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Endpoint = Callable[[BaseModel, Request], Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    """What a direct route is to the rest of the gateway: `scope["route"]`, whose `path` (as
    declared, without the /v1 prefix) labels the HTTP metrics as FastAPI's routes do."""

    path: str
    body: type[BaseModel]
    endpoint: Endpoint


class DirectRoutes:
    def __init__(
        self, app: ASGIApp, *, routes: Mapping[str, tuple[type[BaseModel], Endpoint]], prefixes: tuple[str, ...]
    ) -> None:
        """`routes` by path as declared on their router, served under each of `prefixes`."""
        self.app = app
        self.routes = {
            prefix + path: DirectRoute(path, body, endpoint)
            for path, (body, endpoint) in routes.items()
            for prefix in prefixes
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            raw = await request.body()
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as error:  # noqa: BLE001 - answered as FastAPI's handlers would (a body over the limit)
            await (await _handled(request, error))(scope, receive, send)
            return
        body = _validated(route.body, raw)
        if body is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        scope["route"] = route
        try:
            response = await route.endpoint(body, request)
        except Exception as error:  # noqa: BLE001 - every error gets the application's answer for it
            response = await _handled(request, error)
        await response(scope, receive, send)


def _validated(model: type[BaseModel], raw: bytes) -> BaseModel | None:
    """The body as `model`, or None when FastAPI should answer it (with its own error)."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    try:
        return model.model_validate(document)
    except ValidationError:
        return None


def _replay(raw: bytes, receive: Receive) -> Receive:
    """`receive` that gives the body already read, then what the client sends next (a disconnect)."""
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive_again


async def _handled(request: Request, error: Exception) -> Response:
    """The response of the application's exception handler for `error` (the nearest class)."""
    handlers = request.app.exception_handlers
    for cls in type(error).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            return await handler(request, error)
    raise error
