"""Encoder calls into one Triton as messages of one long-lived `ModelStreamInfer` stream.

Embedding and rerank calls are small and come all day long, and each unary `ModelInfer` call
costs its set-up and tear-down on both sides (grpc's own work per RPC here, and Triton's handler
per RPC there). So each node's encoder calls travel as messages of one bidirectional stream, the
way the gateway's calls reach this service (docs/BATCHING.md, sections 8 and 10). Triton answers
each message with the request's own id, so calls of any model share the stream.

What a unary call had, each message keeps: its own answer or its own error (Triton's error for a
request is that request's answer; the stream goes on), its request id in Triton's log (the id is
the caller's request id with the message's number), and the caller's deadline and cancellation,
which end the caller's wait (Triton finishes the execution and its answer is dropped: unlike a
unary call, a stream cannot cancel one request inside Triton). A stream that breaks (Triton
stopped, the connection lost) fails the calls it carried with the broken connection's error,
which routing treats as the node's failure, and the next call opens a new stream. An error that
Triton sends without the request's id (it does for requests it could not even read) answers the
only call waiting, or else makes every waiting call run again as a unary call, which gets its own
error back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc._utils import get_error_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, serialize_byte_tensor


class RunAlone(Exception):
    """The stream cannot tell whose answer an error was: run the call as a unary call."""


def request(
    model: str, arrays: Mapping[str, np.ndarray], output: str, request_id: str
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest carrying `arrays` as raw contents, asking for `output`."""
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in arrays.items():
        message.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        if array.dtype == np.object_:
            serialized = serialize_byte_tensor(array)
            message.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            message.raw_input_contents.append(array.tobytes())
    message.outputs.add(name=output)
    return message


class TritonStream:
    """The calls to one Triton that travel on its stream; the stream is opened at the first call
    and again at the first call after it broke."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._stream: _Stream | None = None
        self._numbers = itertools.count(1)

    async def infer(
        self, model: str, arrays: Mapping[str, np.ndarray], output: str, *, request_id: str = ""
    ) -> np.ndarray:
        """`output` for `arrays`. Raises Triton's error for this request as InferenceServerException,
        and RunAlone when the stream cannot tell whether an error was this request's."""
        stream = self._stream
        if stream is None or stream.ended:
            stream = self._stream = _Stream(self._stub)
        number = next(self._numbers)
        message = request(model, arrays, output, f"{request_id}#{number}" if request_id else str(number))
        result = await stream.call(message)
        return InferResult(result).as_numpy(output)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None


class _Stream:
    """One ModelStreamInfer call: a writer task sends the messages (grpc cancels a whole stream
    when one write is interrupted, so callers never write themselves) and a reader task hands
    each answer to the call waiting for it."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self.ended = False
        self._call = stub.ModelStreamInfer()
        self._outbox: asyncio.Queue[service_pb2.ModelInferRequest] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[service_pb2.ModelInferResponse]] = {}
        self._writer = asyncio.create_task(self._write(), name="triton-stream-writer")
        self._reader = asyncio.create_task(self._read(), name="triton-stream-reader")

    async def call(self, message: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        answer = asyncio.get_running_loop().create_future()
        self._waiting[message.id] = answer
        self._outbox.put_nowait(message)
        try:
            return await answer
        finally:
            self._waiting.pop(message.id, None)

    async def _write(self) -> None:
        try:
            while True:
                await self._call.write(await self._outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever broke the stream is its waiting calls' answer
            self._end(_stream_error(error))

    async def _read(self) -> None:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                self._answer(response)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever broke the stream is its waiting calls' answer
            self._end(_stream_error(error))
        else:
            self._end(InferenceServerException("Triton ended the stream.", status="StatusCode.UNAVAILABLE"))

    def _answer(self, response: service_pb2.ModelStreamInferResponse) -> None:
        answer = response.infer_response
        waiting = self._waiting.get(answer.id)
        if not response.error_message:
            if waiting is not None and not waiting.done():
                waiting.set_result(answer)
            return  # an answer to a call that gave up
        error = InferenceServerException(response.error_message)
        if answer.id:
            if waiting is not None and not waiting.done():
                waiting.set_exception(error)
            return  # an error for a call that gave up
        # Without an id: the only call waiting, or else each runs again alone to get its own answer.
        if len(self._waiting) == 1:
            waiting = next(iter(self._waiting.values()))
            if not waiting.done():
                waiting.set_exception(error)
            return
        for other in self._waiting.values():
            if not other.done():
                other.set_exception(RunAlone(response.error_message))

    def _end(self, error: BaseException) -> None:
        self.ended = True
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(error)
        self._call.cancel()
        for task in (self._writer, self._reader):
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self._end(InferenceServerException("The stream was closed.", status="StatusCode.CANCELLED"))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._writer, self._reader, return_exceptions=True)


def _stream_error(error: BaseException) -> InferenceServerException:
    if isinstance(error, grpc.RpcError):
        return get_error_grpc(error)
    return InferenceServerException(f"The stream to Triton failed: {error}", status="StatusCode.UNAVAILABLE")
