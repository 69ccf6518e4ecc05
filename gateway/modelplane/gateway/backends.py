"""The gateway's gRPC clients, and the one path every call to a service takes.

Each call carries the request id and what is left of the request's deadline, is refused when the
caller's API key may not use the model the message names, and turns every failure into a
`ModelplaneError` that errors.py maps to an HTTP response. Routes call `unary` (or `stream`, for
server-streaming RPCs), or `unary_split` for a batch larger than one call should carry; `embed`
coalesces the Embed calls of concurrent small requests (common/coalescing.py). Embed and Rerank
calls travel as messages of one long-lived stream per model (call_streams.py), with the same
deadlines, request ids and errors as unary calls.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from fastapi import Request
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.channels import open_channel
from modelplane.common.coalescing import Coalescer, coalescing_metrics
from modelplane.common.errors import DeadlineExceeded, ModelplaneError
from modelplane.common.grpc_errors import to_modelplane_error
from modelplane.common.request_context import REQUEST_ID_HEADER, current_request_id, outgoing_metadata
from modelplane.gateway.auth import authorize_model
from modelplane.gateway.call_streams import CallStreams, CallTimedOut, SendUnary
from modelplane.gateway.limits import remaining_seconds
from modelplane.inference.v1 import inference_service_pb2 as inference_pb
from modelplane.inference.v1 import inference_service_pb2_grpc
from modelplane.registry.v1 import registry_service_pb2_grpc

T = TypeVar("T")

EMBED_METRICS = coalescing_metrics("modelplane_gateway_embed", "small embedding requests")
# The gateway writes vectors as JSON or base64 straight from their float32 bytes (routes/embeddings.py).
_PACKED = inference_pb.VECTOR_ENCODING_PACKED_FLOAT32


@dataclass(frozen=True)
class EmbedAnswer:
    """One request's share of an Embed call: its embeddings, in its inputs' order."""

    model: str
    embeddings: Sequence[inference_pb.Embedding]
    prompt_tokens: int


@dataclass(frozen=True)
class _EmbedItem:
    inputs: Sequence[inference_pb.EmbedInput]
    deadline: float
    request_id: str


class Backends:
    def __init__(
        self,
        inference_address: str,
        registry_address: str,
        timeout_seconds: float,
        *,
        embed_calls_in_flight: int = 2,
        embed_coalesce_inputs: int = 32,
        inference_streams: bool = True,
    ) -> None:
        self.timeout = timeout_seconds
        self.embed_coalesce_inputs = embed_coalesce_inputs
        self._embeds = Coalescer[str, _EmbedItem, EmbedAnswer](
            self._send_embeds, calls_in_flight=embed_calls_in_flight, metrics=EMBED_METRICS
        )
        self._inference_channel = open_channel(inference_address)
        self._registry_channel = open_channel(registry_address)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self._inference_channel)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self._registry_channel)
        self._streams = CallStreams(self.inference) if inference_streams else None
        self._health = {
            "inference": health_pb2_grpc.HealthStub(self._inference_channel),
            "registry": health_pb2_grpc.HealthStub(self._registry_channel),
        }

    async def close(self) -> None:
        await self._embeds.close()
        if self._streams is not None:
            await self._streams.close()
        await self._inference_channel.close()
        await self._registry_channel.close()

    def _deadline(self) -> float:
        """Seconds the next call may take: what is left of the request's deadline."""
        left = remaining_seconds()
        if left is None:
            return self.timeout
        if left <= 0:
            raise self._deadline_exceeded()
        return left

    def _deadline_exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"The request did not finish within its deadline of {self.timeout:g} s. Retry it; if it keeps "
            "happening, send smaller batches, or raise MODELPLANE_GATEWAY_REQUEST_TIMEOUT_SECONDS (a first request "
            "to a model that is not loaded waits for the load).",
            reason="DEADLINE_EXCEEDED",
        )

    def _translate(self, error: grpc.aio.AioRpcError, peer: str) -> ModelplaneError:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._deadline_exceeded()
        return to_modelplane_error(error, peer=peer)

    async def unary(self, peer: str, method: Any, request: Message) -> Any:
        """One unary call to `peer` ("inference" or "registry"); Embed and Rerank go as a message
        of their model's stream."""
        _authorize(request)
        if isinstance(request, inference_pb.EmbedRequest | inference_pb.RerankRequest):
            return await self._inference_call(request, self._deadline(), current_request_id.get())
        try:
            return await method(request, timeout=self._deadline(), metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, peer) from None

    async def _inference_call(
        self, request: inference_pb.EmbedRequest | inference_pb.RerankRequest, seconds: float, request_id: str
    ) -> Any:
        """Embed or Rerank, on the model's stream (or as a unary call, where the inference service
        has no streams), within `seconds`; failures as `ModelplaneError`."""
        embed = isinstance(request, inference_pb.EmbedRequest)
        if self._streams is not None and self._streams.supported:
            message = inference_pb.EncodeStreamRequest(
                timeout_ms=max(1, int(seconds * 1000)),
                request_id=request_id,
                **{"embed" if embed else "rerank": request},
            )
            try:
                answer = await self._streams.call(request.model, message, seconds)
            except CallTimedOut:
                raise self._deadline_exceeded() from None
            except SendUnary:
                pass
            except ModelplaneError as error:
                if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise self._deadline_exceeded() from None
                raise
            else:
                return answer.embed if embed else answer.rerank
        method = self.inference.Embed if embed else self.inference.Rerank
        try:
            return await method(request, timeout=seconds, metadata=((REQUEST_ID_HEADER, request_id),))
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, "inference") from None

    async def stream(self, peer: str, method: Any, request: Message) -> AsyncIterator[Any]:
        """The responses of one server-streaming call, as they arrive."""
        _authorize(request)
        call = method(request, timeout=self._deadline(), metadata=outgoing_metadata())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, peer) from None
        finally:
            call.cancel()

    async def unary_split(
        self,
        peer: str,
        method: Any,
        items: Sequence[T],
        build: Callable[[Sequence[T]], Message],
        *,
        size: int,
        concurrency: int,
    ) -> list[tuple[int, Any]]:
        """Calls `method` once per slice of `items` of at most `size`, at most `concurrency` at a
        time, and returns (offset of the slice, response) in order. An error that names an input by
        its position (`index` in its metadata) is renumbered to the input's position in `items`."""
        gate = asyncio.Semaphore(concurrency)

        async def call(offset: int) -> tuple[int, Any]:
            async with gate:
                try:
                    return offset, await self.unary(peer, method, build(items[offset : offset + size]))
                except ModelplaneError as error:
                    raise _renumbered(error, offset) from None

        return list(await asyncio.gather(*(call(offset) for offset in range(0, len(items), size))))

    async def embed(
        self, model: str, inputs: Sequence[inference_pb.EmbedInput], *, size: int, concurrency: int
    ) -> list[tuple[int, EmbedAnswer]]:
        """Embeds `inputs` with `model`: (offset, answer) per call, in order. A small request shares
        its call with the small requests that arrive while the model's calls are busy; a larger
        one is split into calls of `size`, `concurrency` at a time."""
        if len(inputs) > self.embed_coalesce_inputs:
            answers = await self.unary_split(
                "inference",
                self.inference.Embed,
                inputs,
                lambda chunk: inference_pb.EmbedRequest(model=model, inputs=chunk, vector_encoding=_PACKED),
                size=size,
                concurrency=concurrency,
            )
            return [(offset, _answer(response)) for offset, response in answers]
        authorize_model(model)  # here, in the request's own context: the shared call runs in another's
        left = self._deadline()
        item = _EmbedItem(inputs, time.monotonic() + left, current_request_id.get())
        try:
            async with asyncio.timeout(left):  # no task of its own, unlike wait_for: this is the hot path
                answer = await self._embeds.run(model, item, size=len(inputs), limit=size)
        except TimeoutError:
            raise self._deadline_exceeded() from None
        return [(0, answer)]

    async def _send_embeds(self, model: str, items: list[_EmbedItem]) -> list[EmbedAnswer | BaseException]:
        """One Embed call for every item; each gets its own embeddings and token count. When the
        call fails on one input, each item is sent alone, so that only its request gets the error."""
        left = max(item.deadline for item in items) - time.monotonic()
        if left <= 0:
            raise self._deadline_exceeded()
        request = inference_pb.EmbedRequest(
            model=model, inputs=[one for item in items for one in item.inputs], vector_encoding=_PACKED
        )
        try:
            response = await self._inference_call(request, left, items[0].request_id)
        except ModelplaneError as failure:
            if len(items) == 1 or "index" not in failure.metadata:
                raise
            alone = await asyncio.gather(*(self._send_embeds(model, [item]) for item in items), return_exceptions=True)
            return [result[0] if isinstance(result, list) else result for result in alone]
        if len(items) == 1:
            return [_answer(response)]
        answers: list[EmbedAnswer | BaseException] = []
        offset = 0
        for item in items:
            share = response.embeddings[offset : offset + len(item.inputs)]
            answers.append(EmbedAnswer(response.model, share, sum(embedding.num_tokens for embedding in share)))
            offset += len(item.inputs)
        return answers

    async def health(self) -> dict[str, bool]:
        """Whether each backend answers its health check as SERVING."""
        status = {}
        for name, stub in self._health.items():
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                status[name] = response.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                status[name] = False
        return status


def _answer(response: inference_pb.EmbedResponse) -> EmbedAnswer:
    return EmbedAnswer(response.model, response.embeddings, response.usage.prompt_tokens)


def _authorize(request: Message) -> None:
    """Every inference request names its model in `model`; the caller's key must allow it."""
    if "model" in request.DESCRIPTOR.fields_by_name:
        authorize_model(request.model)  # type: ignore[attr-defined]


def _renumbered(error: ModelplaneError, offset: int) -> ModelplaneError:
    index = error.metadata.get("index")
    if offset == 0 or index is None or not index.isdigit():
        return error
    actual = str(int(index) + offset)
    error.message = re.sub(rf"\b(Input|Document) {index}\b", rf"\g<1> {actual}", error.message, count=1)
    error.metadata["index"] = actual
    return error


def backends(request: Request) -> Backends:
    """The gRPC clients of the application serving this request."""
    return request.app.state.backends
