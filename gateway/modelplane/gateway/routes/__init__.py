"""The HTTP endpoints, one module per family. Each translates its body into gRPC calls and the
answers back; none holds model logic.

A new route gets the gateway's machinery by being included in `api` below, declaring nothing:

- API keys (401), the caller's request rate (429), the body size limit (413) and the request's
  deadline are applied by `middleware.AccessMiddleware` before the route runs.
- Calls through `backends(request).unary(...)` / `.stream(...)` / `.unary_split(...)` carry the
  request id and what is left of the deadline, and refuse (403) a model outside the caller's
  allow-list: every inference request names its model in `model`.
- Raise `errors.GatewayError` subclasses (or let a service's `ModelplaneError` propagate); errors.py
  turns them into OpenAI-style errors. Declare them in the OpenAPI document with
  `responses=schemas.error_responses(*schemas.COMMON_ERRORS, 400, 404, ...)`.
- `limits(request)` has the batch limit (`check_batch`) and the `max_tokens` clamp
  (`clamp_max_tokens`).
"""

from __future__ import annotations

from fastapi import APIRouter

from modelplane.gateway.routes import audio, chat, embeddings, models, probes, rerank

# The OpenAI-compatible API, mounted at /v1 and at the root (users type either as the base URL).
api = APIRouter()
api.include_router(chat.router)
api.include_router(embeddings.router)
api.include_router(rerank.router)
api.include_router(models.router)
api.include_router(audio.router)

__all__ = ["api", "probes"]
