"""Embed and Rerank calls to the inference service over long-lived streams (InferenceService.EncodeStream).

A unary gRPC call per coalesced batch costs its set-up and tear-down on both sides; the gateway
sends such calls all day long, so it keeps one stream per model open and sends each call as a
message with its own id, timeout and request id, and the answer (or the call's own error) comes
back with the same id. One writer task per stream puts the messages on the wire: a caller that
gives up never interrupts a write (grpc cancels the whole stream when a write is cancelled), it
sends a cancellation instead.

A stream that ends (the inference service restarted or stopped; it answers what it was doing
first) is replaced by a new one at the next call. A call the stream took down without an answer is
sent once more on a new stream when the stream ended cleanly or the service was unavailable: a
stopping service answers every call it read, so those calls were not run, and Embed and Rerank
change nothing when run twice. A stream that failed otherwise may not say why: when a write races
with the end of the stream, grpc replaces the stream's status with its own INTERNAL. Such a call
is sent as a unary call, whose status is the service's own. An inference service without
EncodeStream (an older version during a rolling upgrade) answers UNIMPLEMENTED, and every call
after that is a unary call.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc
import structlog

from modelplane.common.errors import ModelplaneError, error_for_code
from modelplane.common.grpc_errors import to_modelplane_error
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc

log = structlog.get_logger()

_RETRIED_ENDINGS = (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)


class SendUnary(Exception):
    """Send this call as a unary call: the inference service has no streams (`supported` is then
    false), or the call's stream failed without saying why."""


class CallTimedOut(Exception):
    """The call's timeout passed before its answer came; the service was told to stop it."""


class _StreamEnded(Exception):
    def __init__(self, status: grpc.StatusCode, error: grpc.aio.AioRpcError | None) -> None:
        super().__init__(status.name)
        self.status = status
        self.error = error


class CallStreams:
    """One EncodeStream per model to the inference service, opened at its first call and again
    after it ends. At most `max_streams` stay open: requests naming ever new models (most of them
    refused) must not pile up streams, so the least recently used idle one is closed first."""

    def __init__(self, stub: inference_service_pb2_grpc.InferenceServiceStub, *, max_streams: int = 32) -> None:
        self.stub = stub
        self.supported = True
        self.max_streams = max_streams
        self._streams: dict[str, _CallStream] = {}  # least recently used first
        self._closing: set[asyncio.Task[None]] = set()

    async def call(self, model: str, message: pb.EncodeStreamRequest, seconds: float) -> pb.EncodeStreamResponse:
        """The answer to `message` (its `id` is set here) within `seconds`. Raises `ModelplaneError` for the call's
        own error or a failure of the stream, `CallTimedOut`, or `SendUnary`."""
        for attempt in range(2):
            stream = self._streams.pop(model, None)
            if stream is None or stream.ended:
                self._close_idle(self.max_streams - 1)
                stream = _CallStream(self.stub, model)
            self._streams[model] = stream
            try:
                answer = await stream.call(message, seconds)
            except _StreamEnded as ended:
                if ended.status == grpc.StatusCode.UNIMPLEMENTED:
                    self.supported = False
                    raise SendUnary() from None
                if ended.status not in _RETRIED_ENDINGS:
                    raise SendUnary() from None
                if attempt == 0:
                    log.info("inference stream ended; sending the call again on a new one", status=ended.status.name)
                    continue
                raise to_modelplane_error(ended.error or _Ended(), peer="inference") from None
            if answer.WhichOneof("result") == "error":
                raise call_failure(answer.error)
            return answer
        raise AssertionError("unreachable")

    def _close_idle(self, keep: int) -> None:
        """Closes the least recently used streams without calls under way until `keep` are left."""
        for model, stream in list(self._streams.items()):
            if len(self._streams) <= keep:
                return
            if stream.idle:
                del self._streams[model]
                self._closing.add(asyncio.create_task(stream.close()))
                self._closing = {task for task in self._closing if not task.done()}

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(stream.close() for stream in streams), *self._closing)


class _Ended(grpc.RpcError):
    """A stream that ended cleanly but without answering, as a failed call says it."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "it ended the call's stream without answering"


class _CallStream:
    def __init__(self, stub: inference_service_pb2_grpc.InferenceServiceStub, model: str) -> None:
        self.model = model
        self.ended = False
        self._call = stub.EncodeStream()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.EncodeStreamResponse]] = {}
        self._outbox: asyncio.Queue[pb.EncodeStreamRequest] = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._write(), name=f"inference-stream-writer-{model}"),
            asyncio.create_task(self._read(), name=f"inference-stream-reader-{model}"),
        ]

    @property
    def idle(self) -> bool:
        return not self._pending

    async def call(self, message: pb.EncodeStreamRequest, seconds: float) -> pb.EncodeStreamResponse:
        call_id = next(self._ids)
        message.id = call_id
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._outbox.put_nowait(message)
        try:
            async with asyncio.timeout(seconds):
                return await future
        except TimeoutError:
            self._cancel(call_id)
            raise CallTimedOut() from None
        except asyncio.CancelledError:
            self._cancel(call_id)
            raise
        finally:
            self._pending.pop(call_id, None)

    def _cancel(self, call_id: int) -> None:
        if not self.ended:
            self._outbox.put_nowait(pb.EncodeStreamRequest(id=call_id, cancel=pb.CancelCall()))

    async def _write(self) -> None:
        try:
            while True:
                await self._call.write(await self._outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream is over; the reader learns how it ended and tells the callers

    async def _read(self) -> None:
        status, error = grpc.StatusCode.OK, None
        try:
            while (answer := await self._call.read()) is not grpc.aio.EOF:
                future = self._pending.get(answer.id)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as failure:
            status, error = failure.code(), failure
        finally:
            self.ended = True
            self._tasks[0].cancel()
            if error is not None and status != grpc.StatusCode.CANCELLED:
                log.warning("inference stream failed", model=self.model, code=status.name, detail=error.details())
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(_StreamEnded(status, error))

    async def close(self) -> None:
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def call_failure(error: pb.CallError) -> ModelplaneError:
    """The call's error, as the gateway's errors would have had it from a unary call's status."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    return error_for_code(code)(
        error.message,
        metadata=dict(error.metadata),
        retry_after_seconds=error.retry_after_seconds if error.HasField("retry_after_seconds") else None,
        reason=error.reason or None,
    )
