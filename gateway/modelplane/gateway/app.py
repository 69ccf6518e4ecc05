"""The FastAPI application: the OpenAI-compatible API that Dify's provider speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelplane.common.errors import ModelplaneError
from modelplane.gateway import errors, schemas
from modelplane.gateway.auth import KeyRing
from modelplane.gateway.backends import Backends
from modelplane.gateway.direct import DirectRoutes
from modelplane.gateway.limits import Limits, RateLimiter
from modelplane.gateway.middleware import PUBLIC_PATHS, AccessMiddleware, RequestContextMiddleware
from modelplane.gateway.routes import api, embeddings, probes
from modelplane.gateway.settings import GatewaySettings

log = structlog.get_logger()


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway application. Its API keys are read from `settings` here and kept only as digests:
    `settings.api_keys` is cleared once read."""
    settings = settings or GatewaySettings()
    keys = KeyRing.from_settings(settings)
    settings.api_keys = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backends = Backends(
            settings.inference_address,
            settings.registry_address,
            settings.request_timeout_seconds,
            embed_calls_in_flight=settings.embed_calls_in_flight,
            embed_coalesce_inputs=settings.embed_coalesce_inputs,
            inference_streams=settings.inference_streams,
        )
        log.info(
            "gateway access",
            api_keys=len(keys),
            open_to_anyone=not keys.enabled,
            rate_limit_per_minute=settings.rate_limit_per_minute,
        )
        yield
        await app.state.backends.close()

    app = FastAPI(
        title="modelplane",
        summary="OpenAI-compatible API of modelplane, for Dify's OpenAI-API-compatible model provider.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.limits = Limits.from_settings(settings)
    # Users type the base URL with or without /v1; both work.
    app.include_router(api, prefix="/v1")
    app.include_router(api, include_in_schema=False)
    app.include_router(probes.router)
    # Added innermost first: a request meets RequestContextMiddleware, then AccessMiddleware, then
    # DirectRoutes, which serves the hot POST routes without FastAPI's routing.
    if settings.direct_routes:
        direct = {"/embeddings": (schemas.EmbeddingsRequest, embeddings.create_embeddings)}
        app.add_middleware(DirectRoutes, routes=direct, prefixes=("/v1", ""))
    app.add_middleware(
        AccessMiddleware,
        keys=keys,
        rate_limiter=RateLimiter(),
        max_body_bytes=settings.max_body_bytes,
        request_timeout_seconds=settings.request_timeout_seconds,
    )
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(errors.GatewayError, errors.handle_gateway_error)
    app.add_exception_handler(ModelplaneError, errors.handle_modelplane_error)
    app.add_exception_handler(RequestValidationError, errors.handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, errors.handle_http_error)
    app.add_exception_handler(Exception, errors.handle_unexpected)
    app.openapi = lambda: _openapi_with_bearer_auth(app)  # type: ignore[method-assign]
    return app


def _openapi_with_bearer_auth(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the Bearer API key every API path takes (the middleware checks it,
    so no route declares it). Without configured keys the key is optional, hence `{}`."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key of this gateway."}
        }
        for path, operations in schema.get("paths", {}).items():
            if path in PUBLIC_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"apiKey": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema
