"""POST /v1/chat/completions and POST /v1/completions, streaming and not, as Dify's
OpenAI-API-compatible provider (and the official openai client) read them.

Streams are server-sent events of `data:` lines only, each followed by a blank line: a `choices`
key in every chunk, `finish_reason` on the last content chunk, then `data: [DONE]`. Every stream
carries its usage once, at its end: with `stream_options.include_usage`, as OpenAI sends it, in a
last chunk of its own with `"choices": []`; without it, on the last content chunk (the one with
`finish_reason`), since a client that did not ask may read `choices[0]` of every chunk (the
official openai client's users do) and would break on an empty list. Dify's SDK, which never asks,
takes `usage` from whichever chunk carries it, so it never counts tokens itself. An error before the
first token is an ordinary HTTP error; one after the stream has started is a chunk with an `error`
object (and no `choices`, which is how Dify's parser recognises it), after which the stream ends.
While the model is still loading, SSE comment lines (`: ...`, which SSE clients and Dify skip)
keep proxies from closing the idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelplane.common.errors import Internal, ModelplaneError
from modelplane.common.request_context import current_request_id
from modelplane.gateway import errors, schemas
from modelplane.gateway.backends import backends
from modelplane.gateway.limits import limits
from modelplane.inference.v1 import inference_service_pb2 as inference_pb

router = APIRouter()
log = structlog.get_logger()

# How long the first token may take before the stream is opened and kept alive with comments.
FIRST_TOKEN_GRACE_SECONDS = 2.0
KEEPALIVE_SECONDS = 5.0
_FINISH_REASONS = {
    inference_pb.FINISH_REASON_STOP: "stop",
    inference_pb.FINISH_REASON_LENGTH: "length",
    inference_pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_TOOL_CHOICES = {
    "auto": inference_pb.TOOL_CHOICE_MODE_AUTO,
    "none": inference_pb.TOOL_CHOICE_MODE_NONE,
    "required": inference_pb.TOOL_CHOICE_MODE_REQUIRED,
}
_RESPONSE_FORMATS = {
    "text": inference_pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": inference_pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": inference_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
# OpenAI's newer clients send the system prompt as "developer"; chat templates know "system".
_ROLES = {"developer": "system"}
_STREAMING = {200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: server-sent events."}}


def _sampling(body: schemas.SamplingFields, request: Request) -> inference_pb.SamplingParameters:
    if body.n not in (None, 1):
        raise errors.BadRequest(f"n={body.n} is not served: each request returns one choice.", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    requested = body.max_completion_tokens or body.max_tokens
    return inference_pb.SamplingParameters(
        # Absent stays absent: the model's own cap (a base model's) or its context applies.
        max_tokens=limits(request).clamp_max_tokens(requested) if requested is not None else None,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=[stop for stop in stops if stop],
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
    )


def _content(message: schemas.ChatMessageIn, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    other = next((part.type for part in message.content if part.type != "text"), None)
    if other is not None:
        raise errors.BadRequest(
            f"Message {index} has a content part of type '{other}', but the models served here read text only (none "
            "has the vision capability in GET /v1/models); send the text alone, or register a model with vision.",
            param=f"messages.{index}.content",
        )
    return "".join(part.text for part in message.content)


def _arguments(arguments: str | dict) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _message(message: schemas.ChatMessageIn, index: int) -> inference_pb.ChatMessage:
    calls = [
        inference_pb.ToolCall(id=c.id, name=c.function.name, arguments_json=_arguments(c.function.arguments))
        for c in message.tool_calls or []
    ]
    if message.function_call is not None:  # the legacy form of one call
        calls.append(
            inference_pb.ToolCall(
                id=message.function_call.name,
                name=message.function_call.name,
                arguments_json=_arguments(message.function_call.arguments),
            )
        )
    role, call_id = _ROLES.get(message.role, message.role), message.tool_call_id or ""
    if message.role == "function":  # the legacy tool result, which names its function instead of a call id
        role, call_id = "tool", message.name or ""
    return inference_pb.ChatMessage(
        role=role, content=_content(message, index), name=message.name or "", tool_calls=calls, tool_call_id=call_id
    )


def _tools(body: schemas.ChatCompletionRequest) -> list[inference_pb.Tool]:
    functions = [t.function for t in body.tools or [] if t.type == "function" and t.function is not None]
    functions += body.functions or []
    return [
        inference_pb.Tool(
            name=f.name,
            description=f.description or "",
            parameters_json=json.dumps(f.parameters) if f.parameters is not None else "",
        )
        for f in functions
    ]


def _tool_choice(body: schemas.ChatCompletionRequest) -> inference_pb.ToolChoice:
    choice, param = (
        (body.tool_choice, "tool_choice") if body.tool_choice is not None else (body.function_call, "function_call")
    )
    if choice is None:
        return inference_pb.ToolChoice()
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise errors.BadRequest(
                f"{param} is '{choice}'; use 'auto', 'none', 'required' or a named function.", param=param
            )
        return inference_pb.ToolChoice(mode=_TOOL_CHOICES[choice])
    name = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
    if not isinstance(name, str) or not name:
        raise errors.BadRequest(
            f'{param} names no function; send {{"type": "function", "function": {{"name": "<tool name>"}}}}.',
            param=param,
        )
    return inference_pb.ToolChoice(mode=inference_pb.TOOL_CHOICE_MODE_FUNCTION, function_name=name)


def _response_format(body: schemas.SamplingFields) -> inference_pb.ResponseFormat | None:
    """OpenAI's response_format; `json_schema` may hold {"name", "schema"} or, as Dify users often
    type it, the schema itself."""
    given = body.response_format
    if given is None:
        return None
    kind = given.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise errors.BadRequest(
            f"response_format type {kind!r} is not known; use 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
        )
    if kind != "json_schema":
        return inference_pb.ResponseFormat(type=_RESPONSE_FORMATS[kind])
    spec = given.get("json_schema")
    if not isinstance(spec, dict):
        raise errors.BadRequest(
            'response_format json_schema needs "json_schema": {"name": ..., "schema": {<JSON schema>}}.',
            param="response_format.json_schema",
        )
    schema, name = (spec["schema"], str(spec.get("name") or "")) if "schema" in spec else (spec, "")
    return inference_pb.ResponseFormat(type=_RESPONSE_FORMATS[kind], schema_json=json.dumps(schema), name=name)


def _usage(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass
class _Piece:
    """What the client gets in one chunk: text, thinking, complete tool calls, and on the last
    piece the finish reason and usage."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Any = None


class _Completion:
    """The identity every chunk of one answer repeats, and the shape of its choices."""

    def __init__(self, chat: bool, model: str, legacy_functions: bool = False) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{current_request_id.get()}"
        self.created = int(time.time())
        self.model = model
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.first = True
        self.calls_sent = 0
        # A request that sent the legacy `functions` gets `function_call` back, not `tool_calls`.
        self.legacy_functions = legacy_functions

    def finish_reason(self, piece: _Piece) -> str | None:
        if piece.finish_reason == "tool_calls" and self.legacy_functions:
            return "function_call"
        return piece.finish_reason

    def chunks(self, piece: _Piece, usage: Any = None) -> list[dict[str, Any]]:
        """The chunks of one piece: its text, then one chunk per tool call, each call whole (Dify
        merges calls by id, the openai client by index); the finish reason, and `usage` when
        given, on the last."""
        if not self.chat:
            choice = {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
            return [self._envelope(choice, usage)]
        deltas: list[dict[str, Any]] = []
        if piece.text or piece.reasoning or not piece.tool_calls:
            delta: dict[str, Any] = {"content": piece.text}
            if piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            deltas.append(delta)
        for call in piece.tool_calls:
            if self.legacy_functions:
                deltas.append({"function_call": {"name": call.name, "arguments": call.arguments_json}})
                break  # the legacy form carries one call
            deltas.append({"tool_calls": [{"index": self.calls_sent, **_tool_call(call)}]})
            self.calls_sent += 1
        out = []
        for n, delta in enumerate(deltas):
            if self.first:
                delta = {"role": "assistant", **delta}
                self.first = False
            last = n == len(deltas) - 1
            reason = self.finish_reason(piece) if last else None
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out.append(self._envelope(choice, usage if last else None))
        return out

    def _envelope(self, choice: dict[str, Any], usage: Any = None) -> dict[str, Any]:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        chunk["choices"] = [choice]
        if usage is not None:
            chunk["usage"] = _usage(usage)
        return chunk

    def usage_chunk(self, usage: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(usage),
        }


def _tool_call(call: Any) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


async def _pieces(responses: AsyncIterator[Any]) -> AsyncIterator[_Piece]:
    """The responses as pieces, with the finish reason on the last piece that carries text: each
    piece is held until the next arrives, and the final response is merged into it."""
    held: _Piece | None = None
    async with contextlib.aclosing(responses):  # type: ignore[type-var]
        try:
            async for response in responses:
                piece = _Piece(
                    text=response.text,
                    reasoning=getattr(response, "reasoning_text", ""),
                    tool_calls=list(getattr(response, "tool_calls", [])),
                )
                if response.finish_reason == inference_pb.FINISH_REASON_UNSPECIFIED:
                    if held is not None:
                        yield held
                    held = piece
                    continue
                if held is not None:
                    piece = _Piece(
                        text=held.text + piece.text,
                        reasoning=held.reasoning + piece.reasoning,
                        tool_calls=held.tool_calls + piece.tool_calls,
                    )
                piece.finish_reason = _FINISH_REASONS.get(response.finish_reason, "stop")
                piece.usage = response.usage
                yield piece
                return
        except Exception:
            if held is not None and (held.text or held.reasoning):  # the client keeps what came before the failure
                yield held
            raise
    raise Internal("The inference service ended the generation without its final chunk.")


async def _first_or_keepalive(pieces: AsyncIterator[_Piece]) -> tuple[asyncio.Task[_Piece], bool]:
    """Starts waiting for the first piece; True when it came (or failed) within the grace period."""
    first = asyncio.ensure_future(anext(pieces))
    done, _ = await asyncio.wait({first}, timeout=FIRST_TOKEN_GRACE_SECONDS)
    return first, bool(done)


async def _event_stream(
    answer: _Completion,
    pieces: AsyncIterator[_Piece],
    first: asyncio.Task[_Piece],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=KEEPALIVE_SECONDS)
            if not first.done():
                yield b": waiting for the model\n\n"
        piece = first.result()
        # Usage rides on the last content chunk unless the client asked for OpenAI's separate
        # usage chunk (`stream_options.include_usage`), whose `choices` is empty.
        for chunk in answer.chunks(piece, None if include_usage else piece.usage):
            yield _sse(chunk)
        async for piece in pieces:
            for chunk in answer.chunks(piece, None if include_usage else piece.usage):
                yield _sse(chunk)
        if include_usage and piece.usage is not None:
            yield _sse(answer.usage_chunk(piece.usage))
        yield _sse("[DONE]")
    except (ModelplaneError, errors.GatewayError) as error:
        yield _sse(errors.stream_error_chunk(error))
    finally:
        # A client that went away cancels this generator: the gRPC call is cancelled with it, and
        # the inference service cancels the request in Triton. While the first piece is still being
        # awaited, cancelling its task does the same (and closing the generator it runs cannot).
        first.cancel()
        with contextlib.suppress(RuntimeError):
            await pieces.aclose()  # type: ignore[attr-defined]


async def _answer(
    request: Request,
    body: schemas.SamplingFields,
    chat: bool,
    call: Callable[[], AsyncIterator[Any]],
    legacy_functions: bool = False,
) -> Any:
    structlog.contextvars.bind_contextvars(model=body.model)
    answer = _Completion(chat, body.model, legacy_functions)
    pieces = _pieces(call())
    if body.stream:
        first, came = await _first_or_keepalive(pieces)
        failure = first.exception() if came else None
        if failure is not None:
            await pieces.aclose()  # type: ignore[attr-defined]
            raise failure  # before the stream has started: an ordinary HTTP error
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _event_stream(answer, pieces, first, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    whole = _Piece(finish_reason="stop")
    async for piece in pieces:
        whole.text += piece.text
        whole.reasoning += piece.reasoning
        whole.tool_calls += piece.tool_calls
        whole.finish_reason, whole.usage = piece.finish_reason or whole.finish_reason, piece.usage or whole.usage
    counts = (
        schemas.CompletionUsage(**_usage(whole.usage))
        if whole.usage is not None
        else schemas.CompletionUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    )
    if chat:
        calls = [schemas.ToolCallOut(**_tool_call(c)) for c in whole.tool_calls]
        message = schemas.ChatCompletionMessage(
            content=whole.text if whole.text or not calls else None,
            reasoning_content=whole.reasoning or None,
        )
        if calls and legacy_functions:
            message.function_call = calls[0].function
        elif calls:
            message.tool_calls = calls
        return schemas.ChatCompletionResponse(
            id=answer.id,
            created=answer.created,
            model=answer.model,
            choices=[schemas.ChatCompletionChoice(message=message, finish_reason=answer.finish_reason(whole))],
            usage=counts,
        )
    return schemas.CompletionResponse(
        id=answer.id,
        created=answer.created,
        model=answer.model,
        choices=[schemas.CompletionChoice(text=whole.text, finish_reason=whole.finish_reason)],
        usage=counts,
    )


@router.post(
    "/chat/completions",
    response_model=schemas.ChatCompletionResponse,
    responses={**_STREAMING, **schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503)},
)
async def create_chat_completion(body: schemas.ChatCompletionRequest, request: Request) -> Any:
    """Answers a conversation with a generation model, rendered with the model's chat template."""
    client = backends(request)
    message = inference_pb.ChatRequest(
        model=body.model,
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        parameters=_sampling(body, request),
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        response_format=_response_format(body),
    )
    legacy = bool(body.functions) and not body.tools
    return await _answer(
        request, body, True, lambda: client.stream("inference", client.inference.Chat, message), legacy
    )


@router.post(
    "/completions",
    response_model=schemas.CompletionResponse,
    responses={**_STREAMING, **schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503)},
)
async def create_completion(body: schemas.CompletionRequest, request: Request) -> Any:
    """Continues a text with a generation model."""
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise errors.BadRequest(
            f"The prompt is a list of {len(body.prompt)} texts; send one text per request.", param="prompt"
        )
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    client = backends(request)
    message = inference_pb.GenerateRequest(
        model=body.model, prompt=prompt, parameters=_sampling(body, request), response_format=_response_format(body)
    )
    return await _answer(request, body, False, lambda: client.stream("inference", client.inference.Generate, message))
