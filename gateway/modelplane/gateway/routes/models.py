"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from modelplane.common.v1 import model_pb2
from modelplane.gateway import schemas
from modelplane.gateway.auth import current_caller
from modelplane.gateway.backends import backends
from modelplane.registry.v1 import registry_service_pb2 as registry_pb

router = APIRouter()

_LISTED_STATES = [
    s
    for s in model_pb2.ModelState.values()
    if s not in (model_pb2.MODEL_STATE_UNSPECIFIED, model_pb2.MODEL_STATE_FAILED)
]
_TASKS = {
    model_pb2.TASK_EMBEDDING: "embedding",
    model_pb2.TASK_RERANK: "rerank",
    model_pb2.TASK_GENERATION: "generation",
    model_pb2.TASK_SPEECH2TEXT: "speech2text",
    model_pb2.TASK_TTS: "tts",
}


_CAPABILITIES = ("tools", "json_schema", "reasoning", "vision")


def _generation_facts(model: model_pb2.Model) -> dict[str, object]:
    """Context length and capabilities of a generation model whose profile the loader has written."""
    if model.spec.task != model_pb2.TASK_GENERATION or not model.status.HasField("profile"):
        return {}
    profile = model.status.profile
    return {
        "context_length": profile.context_length or None,
        "capabilities": [name for name in _CAPABILITIES if getattr(profile.capabilities, name)],
    }


@router.get("/models", response_model=schemas.ModelList, responses=schemas.error_responses(401, 429, 500, 503, 504))
async def list_models(request: Request) -> schemas.ModelList:
    """Models that are ready, or that a request loads on demand, which the caller's API key may use."""
    client = backends(request)
    caller = current_caller.get()
    cards: list[schemas.ModelCard] = []
    token = ""
    while True:
        page = await client.unary(
            "registry",
            client.registry.ListModels,
            registry_pb.ListModelsRequest(states=_LISTED_STATES, page_size=1000, page_token=token),
        )
        cards.extend(
            schemas.ModelCard(
                id=m.spec.name,
                created=m.create_time.seconds,
                task=_TASKS.get(m.spec.task, "unknown"),
                state=model_pb2.ModelState.Name(m.status.state).removeprefix("MODEL_STATE_"),
                **_generation_facts(m),
            )
            for m in page.models
            if caller is None or caller.may_use(m.spec.name)
        )
        token = page.next_page_token
        if not token:
            return schemas.ModelList(data=cards)
