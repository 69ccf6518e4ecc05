"""Text generation: completions and chats on decoupled LLM models in Triton, streamed.

A chat is rendered into one prompt with the model's chat template (chosen by the loader: the
model's own, else its family's default), then generated like a completion. The model in Triton
counts the tokens with its own tokenizer, so usage is exact. Around the generation: tool calls
(tool_calls.py), structured output (structured.py) and thinking split from the answer
(reasoning.py) turn the text the model writes into what the caller asked for.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import structlog
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelplane.common.errors import Internal
from modelplane.common.types import Usage
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest, TemplateMissing
from modelplane.inference.reasoning import ReasoningSplitter
from modelplane.inference.structured import guided_decoding, validate_output
from modelplane.inference.tool_calls import ToolCall, ToolPlan, render_history
from modelplane.inference.triton import TritonInferer

log = structlog.get_logger()


class FinishReason(enum.IntEnum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    CANCELLED = 3
    TOOL_CALLS = 4


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
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class GenerationChunk:
    """Text generated since the previous chunk; the last chunk has the finish reason and usage.
    `reasoning` is thinking text, `tool_calls` complete calls (on the last chunk)."""

    text: str
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class _Counts:
    prompt: int = 0
    completion: int = 0


def sampling_for_triton(
    parameters: SamplingParameters,
    context_length: int,
    default_max_tokens: int = 0,
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `sampling_parameters` JSON of Triton's vLLM convention: only what the caller set, so
    each engine keeps its own neutral defaults, and always `max_tokens` (vLLM's default is 16): the
    caller's, else the model's default cap (a base model's), else the context; the model clamps it
    to what fits in its context after the prompt. A schema becomes vLLM's `guided_decoding`."""
    values: dict[str, Any] = {"max_tokens": parameters.max_tokens or default_max_tokens or context_length}
    if schema is not None:
        values["guided_decoding"] = guided_decoding(schema)
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


def render_chat(serving: ServingModel, messages: Sequence[ChatMessage], plan: ToolPlan | None = None) -> str:
    """The prompt for a conversation, by the model's chat template (as transformers renders it:
    a sandboxed Jinja environment, `messages`, `add_generation_prompt`, the special tokens), with
    tools and earlier tool calls in the generic form (tool_calls.py)."""
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
    rendered = render_history(messages, plan)
    try:
        return _TEMPLATES.from_string(template).render(
            messages=rendered, add_generation_prompt=True, **serving.profile.special_tokens
        )
    except jinja2.TemplateError as error:
        raise InvalidRequest(
            f"Model '{serving.name}''s chat template refused the conversation: {error}",
            metadata={"model": serving.name},
        ) from None


async def generate(
    triton: TritonInferer,
    serving: ServingModel,
    prompt: str,
    parameters: SamplingParameters,
    *,
    schema: dict[str, Any] | None = None,
    request_id: str = "",
) -> AsyncIterator[GenerationChunk]:
    """Streams one generation, constrained to `schema` when one is given. The caller closing the
    iterator (its client went away) cancels it in Triton."""
    if not prompt:
        raise InvalidRequest("The prompt is empty; send some text to complete.")
    sampling = sampling_for_triton(
        parameters,
        serving.profile.context_length or 4096,
        serving.model.spec.runtime_hints.default_max_tokens,
        schema,
    )
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


async def tool_answer(
    chunks: AsyncIterator[GenerationChunk], plan: ToolPlan, schema: dict[str, Any], model: str
) -> AsyncIterator[GenerationChunk]:
    """The answer of a chat with tools: the constrained JSON the model writes, read whole, becomes
    either complete tool calls or the answer's text; nothing of the JSON reaches the text."""
    texts = []
    async for chunk in chunks:
        texts.append(chunk.text)
        if chunk.finish_reason == FinishReason.UNSPECIFIED:
            continue
        text = "".join(texts)
        if chunk.finish_reason == FinishReason.LENGTH:
            raise InvalidRequest(
                f"Model '{model}' reached max_tokens before its answer (a tool call or a reply in JSON) was "
                "complete; raise max_tokens.",
                metadata={"param": "max_tokens"},
            )
        _check_constrained(text, schema, model)
        content, calls = plan.parse(text)
        yield GenerationChunk(
            text=content or "",
            finish_reason=FinishReason.TOOL_CALLS if calls else chunk.finish_reason,
            usage=chunk.usage,
            tool_calls=tuple(calls),
        )


async def structured_answer(
    chunks: AsyncIterator[GenerationChunk], schema: dict[str, Any], model: str
) -> AsyncIterator[GenerationChunk]:
    """Streams a constrained answer as it comes and checks it once complete."""
    texts = []
    async for chunk in chunks:
        texts.append(chunk.text)
        if chunk.finish_reason == FinishReason.STOP:
            _check_constrained("".join(texts), schema, model)
        yield chunk


async def split_reasoning(chunks: AsyncIterator[GenerationChunk], prompt: str) -> AsyncIterator[GenerationChunk]:
    """Moves the thinking of the answer into `reasoning`."""
    splitter = ReasoningSplitter(prompt)
    async for chunk in chunks:
        reasoning, text = splitter.push(chunk.text)
        if chunk.finish_reason != FinishReason.UNSPECIFIED:
            held_reasoning, held_text = splitter.flush()
            reasoning, text = reasoning + held_reasoning, text + held_text
        elif not reasoning and not text:
            continue
        yield GenerationChunk(text=text, finish_reason=chunk.finish_reason, usage=chunk.usage, reasoning=reasoning)


def _check_constrained(text: str, schema: dict[str, Any], model: str) -> None:
    problem = validate_output(text, schema)
    if problem is not None:
        # The schema passed every check and still was not enforced: a defect of the engine, not of
        # the request. The answer is withheld rather than passed off as valid.
        log.error("constrained output failed its schema", model=model, problem=problem)
        raise Internal(f"Model '{model}' produced output that does not satisfy the requested schema ({problem}).")
