"""The FastAPI application: the OpenAI-compatible API that Dify's provider speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelplane.common.errors import ModelplaneError
from modelplane.gateway import errors
from modelplane.gateway.backends import Backends
from modelplane.gateway.middleware import RequestContextMiddleware
from modelplane.gateway.routes import api, probes
from modelplane.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backends = Backends(
            settings.inference_address, settings.registry_address, settings.request_timeout_seconds
        )
        yield
        await app.state.backends.close()

    app = FastAPI(
        title="modelplane",
        summary="OpenAI-compatible API of modelplane, for Dify's OpenAI-API-compatible model provider.",
        version="0.1.0",
        lifespan=lifespan,
    )
    # Users type the base URL with or without /v1; both work.
    app.include_router(api, prefix="/v1")
    app.include_router(api, include_in_schema=False)
    app.include_router(probes.router)
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(ModelplaneError, errors.handle_modelplane_error)
    app.add_exception_handler(RequestValidationError, errors.handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, errors.handle_http_error)
    app.add_exception_handler(Exception, errors.handle_unexpected)
    return app
