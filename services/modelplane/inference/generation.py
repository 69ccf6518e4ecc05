"""Text generation: completions and chats on decoupled LLM models in Triton, streamed.

A chat is rendered into one prompt with the model's chat template (chosen by the loader: the
model's own, else its family's default), then generated like a completion. The model in Triton
counts the tokens with its own tokenizer, so usage is exact. Around the generation: tool calls
(in the template's own Hermes form, template_tools.py, else the generic form, tool_calls.py),
structured output (structured.py) and thinking split from the answer
(reasoning.py) turn the text the model writes into what the caller asked for.
"""

from __future__ import annotations

import enum
import functools
import json
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
from modelplane.inference.routing import Router
from modelplane.inference.structured import guided_decoding, validate_output
from modelplane.inference.template_tools import (
    TemplateTools,
    may_render_tools,
    probe_conversation,
    probe_shows_the_form,
)
from modelplane.inference.tool_calls import ToolCall, ToolPlan, render_history

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
    grammar: str | None = None,
) -> dict[str, Any]:
    """The `sampling_parameters` JSON of Triton's vLLM convention: only what the caller set, so
    each engine keeps its own neutral defaults, and always `max_tokens` (vLLM's default is 16): the
    caller's, else the model's default cap (a base model's), else the context; the model clamps it
    to what fits in its context after the prompt. A schema or a grammar becomes vLLM's
    `guided_decoding`."""
    values: dict[str, Any] = {"max_tokens": parameters.max_tokens or default_max_tokens or context_length}
    if schema is not None:
        values["guided_decoding"] = guided_decoding(schema)
    elif grammar is not None:
        values["guided_decoding"] = {"grammar": grammar}
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


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers' own filter: Jinja's escapes <, >, & and ' for HTML, which no template means.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES.globals["raise_exception"] = _raise_exception
_TEMPLATES.filters["tojson"] = _tojson

ToolForm = ToolPlan | TemplateTools


def tool_form(template: str, plan: ToolPlan) -> ToolForm:
    """The form the model calls tools in: its template's own Hermes form where the template
    renders one (template_tools.py), else the generic form."""
    return TemplateTools(plan) if renders_hermes_tools(template) else plan


@functools.lru_cache(maxsize=64)
def renders_hermes_tools(template: str) -> bool:
    """Whether the template lists tools and writes calls and results in the Hermes form, judged by
    rendering a probe conversation through it."""
    if not may_render_tools(template):
        return False
    messages, tools = probe_conversation()
    try:
        rendered = _TEMPLATES.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError):
        return False
    return probe_shows_the_form(rendered)


def render_chat(serving: ServingModel, messages: Sequence[ChatMessage], form: ToolForm | None = None) -> str:
    """The prompt for a conversation, by the model's chat template (as transformers renders it:
    a sandboxed Jinja environment, `messages`, `add_generation_prompt`, the special tokens), with
    tools and earlier tool calls in the form's way (`tool_form`)."""
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
    rendered = form.history(messages) if form is not None else render_history(messages, None)
    variables = form.template_variables() if form is not None else {}
    try:
        return _TEMPLATES.from_string(template).render(
            messages=rendered, add_generation_prompt=True, **variables, **serving.profile.special_tokens
        )
    except jinja2.TemplateError as error:
        raise InvalidRequest(
            f"Model '{serving.name}''s chat template refused the conversation: {error}",
            metadata={"model": serving.name},
        ) from None


async def generate(
    triton: Router,
    serving: ServingModel,
    prompt: str,
    parameters: SamplingParameters,
    *,
    schema: dict[str, Any] | None = None,
    grammar: str | None = None,
    request_id: str = "",
) -> AsyncIterator[GenerationChunk]:
    """Streams one generation, constrained to `schema` or `grammar` when one is given. The caller
    closing the iterator (its client went away) cancels it in Triton."""
    if not prompt:
        raise InvalidRequest("The prompt is empty; send some text to complete.")
    sampling = sampling_for_triton(
        parameters,
        serving.profile.context_length or 4096,
        serving.model.spec.runtime_hints.default_max_tokens,
        schema,
        grammar,
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
    chunks: AsyncIterator[GenerationChunk], form: ToolForm, model: str
) -> AsyncIterator[GenerationChunk]:
    """The answer of a chat with tools: the constrained answer the model writes (after the form's
    prefill) becomes either complete tool calls, on the last chunk, or the answer's text, streamed as
    it is generated; nothing of the calls reaches the text. The whole answer is checked against the
    form's schema or grammar once complete."""
    texts = [form.prefill()]
    reader = form.reader()
    reader.push(form.prefill())
    sent = 0
    async for chunk in chunks:
        texts.append(chunk.text)
        fresh = reader.push(chunk.text)
        sent += len(fresh)
        if chunk.finish_reason == FinishReason.UNSPECIFIED:
            if fresh:
                yield GenerationChunk(text=fresh)
            continue
        if chunk.finish_reason == FinishReason.LENGTH:
            if reader.started:
                # A text answer cut off by max_tokens, as without tools.
                yield GenerationChunk(text=fresh, finish_reason=FinishReason.LENGTH, usage=chunk.usage)
                return
            raise InvalidRequest(
                f"Model '{model}' reached max_tokens before its answer (a tool call or a reply in JSON) was "
                "complete; raise max_tokens.",
                metadata={"param": "max_tokens"},
            )
        text = "".join(texts) + form.suffix()
        _check_constrained(form.problem(text), model)
        content, calls = form.parse(text)
        # What the reader has not yet returned of the text (all of it when the response is not a string).
        rest = fresh + (content or "")[sent:]
        yield GenerationChunk(
            text="" if calls else rest,
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
            _check_constrained(validate_output("".join(texts), schema), model)
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


def _check_constrained(problem: str | None, model: str) -> None:
    if problem is not None:
        # The schema or grammar passed every check and still was not enforced: a defect of the
        # engine, not of the request. The answer is withheld rather than passed off as valid.
        log.error("constrained output failed its schema", model=model, problem=problem)
        raise Internal(f"Model '{model}' produced output that does not satisfy the requested schema ({problem}).")
