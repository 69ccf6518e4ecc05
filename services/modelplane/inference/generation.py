"""Text generation: completions and chats on decoupled LLM models in Triton, streamed.

A chat is rendered into one prompt with the model's chat template (chosen by the loader: the
model's own, else its family's default), then generated like a completion. The model in Triton
counts the tokens with its own tokenizer, so usage is exact.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import structlog
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelplane.common.types import Usage
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest, TemplateMissing
from modelplane.inference.triton import TritonInferer

log = structlog.get_logger()


class FinishReason(enum.IntEnum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    CANCELLED = 3


_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


@dataclass(frozen=True)
class SamplingParameters:
    """What the caller set; None (or empty) leaves the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""


@dataclass(frozen=True)
class GenerationChunk:
    """Text generated since the previous chunk; the last chunk has the finish reason and usage."""

    text: str
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage | None = None


@dataclass
class _Counts:
    prompt: int = 0
    completion: int = 0


def sampling_for_triton(parameters: SamplingParameters, context_length: int) -> dict[str, Any]:
    """The `sampling_parameters` JSON of Triton's vLLM convention: only what the caller set, so
    each engine keeps its own neutral defaults, and always `max_tokens` (vLLM's default is 16);
    the model clamps it to what fits in its context after the prompt."""
    values: dict[str, Any] = {"max_tokens": parameters.max_tokens or context_length}
    for key in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(parameters, key)
        if value is not None:
            values[key] = value
    if parameters.repetition_penalty is not None:
        values["repetition_penalty"] = parameters.repetition_penalty
    if parameters.stop:
        values["stop"] = list(parameters.stop)
    return values


_TEMPLATES = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


_TEMPLATES.globals["raise_exception"] = _raise_exception


def render_chat(serving: ServingModel, messages: Sequence[ChatMessage]) -> str:
    """The prompt for a conversation, by the model's chat template (as transformers renders it:
    a sandboxed Jinja environment, `messages`, `add_generation_prompt`, the special tokens)."""
    template = serving.profile.chat_template
    if not template:
        raise TemplateMissing(
            f"Model '{serving.name}' has no chat template (its package ships none and its family has no known "
            "default), so it cannot chat. Use /v1/completions with it, or register it again with a chat template "
            "in its runtime hints.",
            metadata={"model": serving.name},
        )
    if not messages:
        raise InvalidRequest("The conversation has no messages; send at least one.")
    try:
        return _TEMPLATES.from_string(template).render(
            messages=[{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages],
            add_generation_prompt=True,
            **serving.profile.special_tokens,
        )
    except jinja2.TemplateError as error:
        raise InvalidRequest(
            f"Model '{serving.name}''s chat template refused the conversation: {error}",
            metadata={"model": serving.name},
        ) from None


async def generate(
    triton: TritonInferer, serving: ServingModel, prompt: str, parameters: SamplingParameters, *, request_id: str = ""
) -> AsyncIterator[GenerationChunk]:
    """Streams one generation. The caller closing the iterator (its client went away) cancels it in Triton."""
    if not prompt:
        raise InvalidRequest("The prompt is empty; send some text to complete.")
    sampling = sampling_for_triton(parameters, serving.profile.context_length or 4096)
    counts = _Counts()
    stream = triton.generate(serving.profile.triton_model_name, prompt, sampling, stream=True, request_id=request_id)
    try:
        async for chunk in stream:
            counts.prompt = chunk.prompt_tokens or counts.prompt
            counts.completion += chunk.new_tokens
            if not chunk.final:
                if chunk.text:
                    yield GenerationChunk(text=chunk.text)
                continue
            reason = _FINISH_REASONS.get(chunk.finish_reason, FinishReason.STOP)
            yield GenerationChunk(
                text=chunk.text,
                finish_reason=reason,
                usage=Usage(prompt_tokens=counts.prompt, completion_tokens=counts.completion),
            )
    finally:
        await stream.aclose()
