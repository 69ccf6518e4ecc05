"""The HTTP endpoints, one module per family. Each translates its body into gRPC calls and the
answers back; none holds model logic."""

from __future__ import annotations

from fastapi import APIRouter

from modelplane.gateway.routes import embeddings, models, probes

# The OpenAI-compatible API, mounted at /v1 and at the root (users type either as the base URL).
api = APIRouter()
api.include_router(embeddings.router)
api.include_router(models.router)

__all__ = ["api", "probes"]
