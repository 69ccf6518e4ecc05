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
_FINISH_REASONS = {inference_pb.FINISH_REASON_STOP: "stop", inference_pb.FINISH_REASON_LENGTH: "length"}
# OpenAI's newer clients send the system prompt as "developer"; chat templates know "system".
_ROLES = {"developer": "system"}
_STREAMING = {200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: server-sent events."}}


def _sampling(body: schemas.SamplingFields, request: Request) -> inference_pb.SamplingParameters:
    if body.n not in (None, 1):
        raise errors.BadRequest(f"n={body.n} is not served: each request returns one choice.", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return inference_pb.SamplingParameters(
        max_tokens=limits(request).clamp_max_tokens(body.max_completion_tokens or body.max_tokens),
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
            f"Message {index} has a content part of type '{other}'; the models served here take text only.",
            param=f"messages.{index}.content",
        )
    return "".join(part.text for part in message.content)


def _usage(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Completion:
    """The identity every chunk of one answer repeats, and the shape of its choices."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{current_request_id.get()}"
        self.created = int(time.time())
        self.model = model
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.first = True

    def chunk(self, text: str, finish_reason: str | None, usage: Any = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if self.first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        self.first = False
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


async def _pieces(responses: AsyncIterator[Any]) -> AsyncIterator[tuple[str, str | None, Any]]:
    """(text, finish reason, usage) with the finish reason on the last piece that carries text:
    each piece is held until the next arrives, and the final response's text is merged into it."""
    held: str | None = None
    async with contextlib.aclosing(responses):  # type: ignore[type-var]
        try:
            async for response in responses:
                if response.finish_reason == inference_pb.FINISH_REASON_UNSPECIFIED:
                    if held is not None:
                        yield held, None, None
                    held = response.text
                    continue
                yield (held or "") + response.text, _FINISH_REASONS.get(response.finish_reason, "stop"), response.usage
                return
        except Exception:
            if held:  # the client keeps the text generated before the failure
                yield held, None, None
            raise
    raise Internal("The inference service ended the generation without its final chunk.")


async def _first_or_keepalive(
    pieces: AsyncIterator[tuple[str, str | None, Any]],
) -> tuple[asyncio.Task[tuple[str, str | None, Any]], bool]:
    """Starts waiting for the first piece; True when it came (or failed) within the grace period."""
    first = asyncio.ensure_future(anext(pieces))
    done, _ = await asyncio.wait({first}, timeout=FIRST_TOKEN_GRACE_SECONDS)
    return first, bool(done)


async def _event_stream(
    answer: _Completion,
    pieces: AsyncIterator[tuple[str, str | None, Any]],
    first: asyncio.Task[tuple[str, str | None, Any]],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=KEEPALIVE_SECONDS)
            if not first.done():
                yield b": waiting for the model\n\n"
        piece = first.result()
        yield _sse(answer.chunk(piece[0], piece[1], None if include_usage else piece[2]))
        async for piece in pieces:
            yield _sse(answer.chunk(piece[0], piece[1], None if include_usage else piece[2]))
        usage = piece[2]
        if include_usage and usage is not None:
            yield _sse(answer.usage_chunk(usage))
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
) -> Any:
    structlog.contextvars.bind_contextvars(model=body.model)
    answer = _Completion(chat, body.model)
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
    texts = []
    finish_reason, usage = "stop", None
    async for text, reason, last_usage in pieces:
        texts.append(text)
        finish_reason, usage = reason or finish_reason, last_usage or usage
    text = "".join(texts)
    counts = (
        schemas.CompletionUsage(**_usage(usage))
        if usage is not None
        else schemas.CompletionUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    )
    if chat:
        return schemas.ChatCompletionResponse(
            id=answer.id,
            created=answer.created,
            model=answer.model,
            choices=[
                schemas.ChatCompletionChoice(
                    message=schemas.ChatCompletionMessage(content=text), finish_reason=finish_reason
                )
            ],
            usage=counts,
        )
    return schemas.CompletionResponse(
        id=answer.id,
        created=answer.created,
        model=answer.model,
        choices=[schemas.CompletionChoice(text=text, finish_reason=finish_reason)],
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
        messages=[
            inference_pb.ChatMessage(role=_ROLES.get(m.role, m.role), content=_content(m, i), name=m.name or "")
            for i, m in enumerate(body.messages)
        ],
        parameters=_sampling(body, request),
    )
    return await _answer(request, body, True, lambda: client.stream("inference", client.inference.Chat, message))


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
    message = inference_pb.GenerateRequest(model=body.model, prompt=prompt, parameters=_sampling(body, request))
    return await _answer(request, body, False, lambda: client.stream("inference", client.inference.Generate, message))
