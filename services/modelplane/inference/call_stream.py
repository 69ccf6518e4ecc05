"""InferenceService.EncodeStream: Embed and Rerank calls carried as messages of one long-lived stream.

A unary call costs its set-up and tear-down on both sides (most of it grpc's own C code, and the
interceptor's work per RPC); the gateway sends small coalesced calls all day long, so it keeps one
stream per model open instead and sends each call as a message. Each call here is what a unary
call would be: it runs as a task of its own, under its request id and log context, within its own
timeout, counted in the same metrics under the unary method's name, and its failure is its answer
alone (a `CallError` with what the unary status would have said). A cancellation message stops a
call under way. When the service stops, each stream stops reading, answers what is under way and
ends, so the client opens its next stream to a service that is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from modelplane.common.errors import DeadlineExceeded, InvalidArgument, ModelplaneError
from modelplane.common.interceptors import CallObservation
from modelplane.inference.v1 import inference_service_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
# A call on the stream is counted and logged as the unary call it stands for.
METHODS = {"embed": f"/{_SERVICE}/Embed", "rerank": f"/{_SERVICE}/Rerank"}

# Answers one call: the message and its timeout in seconds (None: no deadline of its own).
Answer = Callable[[pb.EncodeStreamRequest, float | None], Awaitable[pb.EncodeStreamResponse]]


class CallStreams:
    """The EncodeStream streams open in this service."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self._readers: set[asyncio.Task[None]] = set()
        self._draining = False

    def drain(self) -> None:
        """Every stream stops reading, answers the calls under way, and ends; so do new ones."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()

    async def serve(self, requests: AsyncIterator[pb.EncodeStreamRequest]) -> AsyncIterator[pb.EncodeStreamResponse]:
        """The answers of the calls that arrive on one stream, as each finishes."""
        stream = _Stream(self.answer)
        reader = asyncio.create_task(stream.read(requests), name="encode-stream-reader")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        if self._draining:
            reader.cancel()
        try:
            while (answer := await stream.answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            await stream.cancel_calls()


class _Stream:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        # Answers to send; None once reading has ended and every call has answered.
        self.answers: asyncio.Queue[pb.EncodeStreamResponse | None] = asyncio.Queue()
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._reading = True

    async def read(self, requests: AsyncIterator[pb.EncodeStreamRequest]) -> None:
        try:
            async for message in requests:
                self._take(message)
        finally:
            self._reading = False
            self._end_when_answered()

    def _take(self, message: pb.EncodeStreamRequest) -> None:
        kind = message.WhichOneof("call")
        if kind == "cancel":
            call = self._calls.get(message.id)
            if call is not None:
                call.cancel()
            return
        if kind is None or message.id in self._calls:
            what = "names a call under way" if kind else "carries no call"
            error = InvalidArgument(f"EncodeStream message {message.id} {what}; send a new id with embed or rerank.")
            self.answers.put_nowait(pb.EncodeStreamResponse(id=message.id, error=call_error(error)))
            return
        call = asyncio.create_task(self._run(message, METHODS[kind]), name=f"encode-stream-call-{kind}")
        self._calls[message.id] = call
        call.add_done_callback(lambda _, call_id=message.id: self._finished(call_id))

    async def _run(self, message: pb.EncodeStreamRequest, method: str) -> None:
        timeout = message.timeout_ms / 1000 if message.timeout_ms else None
        with CallObservation(method, message.request_id, routine=False) as observation:
            try:
                async with asyncio.timeout(timeout):
                    answer = await self.answer(message, timeout)
            except TimeoutError:
                error = DeadlineExceeded(
                    f"The call did not finish within its timeout of {message.timeout_ms} ms.",
                    metadata={"timeout_ms": str(message.timeout_ms)},
                )
                answer = pb.EncodeStreamResponse(id=message.id, error=call_error(observation.failure(error)))
            except asyncio.CancelledError:
                observation.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:  # noqa: BLE001 - every failure is the call's answer
                answer = pb.EncodeStreamResponse(id=message.id, error=call_error(observation.failure(error)))
            answer.id = message.id
            self.answers.put_nowait(answer)
            # One turn of the loop before the observation ends: the stream hands the answer to grpc
            # first, so the call's log line and metrics are written while it travels, not before.
            await asyncio.sleep(0)

    def _finished(self, call_id: int) -> None:
        self._calls.pop(call_id, None)
        self._end_when_answered()

    def _end_when_answered(self) -> None:
        if not self._reading and not self._calls:
            self.answers.put_nowait(None)

    async def cancel_calls(self) -> None:
        calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def call_error(error: ModelplaneError) -> pb.CallError:
    return pb.CallError(
        code=error.code.value[0],
        message=error.message,
        reason=error.reason,
        metadata=error.metadata,
        retry_after_seconds=error.retry_after_seconds,
    )
