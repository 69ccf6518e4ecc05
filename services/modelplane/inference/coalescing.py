"""Encoder calls to Triton that go together when they arrive together.

Triton's dynamic batcher already runs concurrent requests as one execution, but every request is
still a call of its own: tritonclient builds and parses it here, Triton handles it, and the python
model unpacks it. Dify sends one text per embedding request, so with 16 clients those per-call
costs were about a quarter of the CPU spent on each text (docs/BATCHING.md).

`EncoderCalls` keeps at most `calls_in_flight` calls per model at Triton. A chunk that arrives
while that many are running waits here; when one finishes, every waiting chunk (up to the
model's batch size in rows) goes to Triton as one call. Nothing is held back while a call slot is
free, so a lone client's latency does not change. Chunks are never split: each gets exactly its own
rows back, and a caller that gives up (deadline, disconnect) before its chunk is sent takes it
out of the queue.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import structlog
from prometheus_client import Counter, Histogram

from modelplane.inference.triton import TritonInferer

log = structlog.get_logger()

WAIT_SECONDS = Histogram(
    "modelplane_inference_encoder_wait_seconds",
    "Time an encoder request's chunk waited in the inference service for a free Triton call slot.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CALLS = Counter(
    "modelplane_inference_encoder_calls_total",
    "Triton calls made for encoder models; chunks_total / calls_total is the mean number of "
    "requests' chunks each call carried.",
    ["model"],
)
CHUNKS = Counter(
    "modelplane_inference_encoder_chunks_total", "Request chunks sent to Triton for encoder models.", ["model"]
)


@dataclass(frozen=True)
class EncoderModel:
    """What a call to one encoder model needs: its Triton name, output, largest batch and padding."""

    triton_name: str
    output: str
    max_rows: int
    pad_id: int


@dataclass
class _Chunk:
    arrays: Mapping[str, np.ndarray]
    request_id: str
    result: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return next(iter(self.arrays.values())).shape[0]


@dataclass
class _ModelCalls:
    waiting: collections.deque[_Chunk] = field(default_factory=collections.deque)
    in_flight: int = 0


class EncoderCalls:
    def __init__(self, triton: TritonInferer, calls_in_flight: int) -> None:
        self.triton = triton
        self.calls_in_flight = calls_in_flight
        self._models: dict[str, _ModelCalls] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, model: EncoderModel, arrays: Mapping[str, np.ndarray], *, request_id: str = "") -> np.ndarray:
        """The model's output for these rows (at most `model.max_rows`), in their order."""
        if self.calls_in_flight <= 0:
            return await self._infer(model, arrays, request_id)
        calls = self._models.setdefault(model.triton_name, _ModelCalls())
        chunk = _Chunk(arrays, request_id, asyncio.get_running_loop().create_future())
        calls.waiting.append(chunk)
        self._dispatch(model, calls)
        # Cancelling this caller cancels the future too, and _dispatch skips a cancelled chunk.
        return await chunk.result

    async def close(self) -> None:
        self._closed = True
        for calls in self._models.values():
            while calls.waiting:
                calls.waiting.popleft().result.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _dispatch(self, model: EncoderModel, calls: _ModelCalls) -> None:
        """Starts calls while a slot is free, each with every waiting chunk that fits."""
        while calls.waiting and calls.in_flight < self.calls_in_flight and not self._closed:
            batch: list[_Chunk] = []
            rows = 0
            while calls.waiting and (not batch or rows + calls.waiting[0].rows <= model.max_rows):
                chunk = calls.waiting.popleft()
                if chunk.result.done():  # its caller gave up while it waited
                    continue
                batch.append(chunk)
                rows += chunk.rows
            if not batch:
                return
            calls.in_flight += 1
            task = asyncio.create_task(self._call(model, calls, batch), name=f"encoder-call-{model.triton_name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, model: EncoderModel, calls: _ModelCalls, batch: list[_Chunk]) -> None:
        started = time.monotonic()
        for chunk in batch:
            WAIT_SECONDS.labels(model.triton_name).observe(started - chunk.queued_at)
        try:
            arrays = batch[0].arrays if len(batch) == 1 else _joined([chunk.arrays for chunk in batch], model.pad_id)
            request_id = batch[0].request_id if len(batch) == 1 else f"{batch[0].request_id}+{len(batch) - 1}"
            output = await self._infer(model, arrays, request_id)
        except asyncio.CancelledError:
            for chunk in batch:
                chunk.result.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every caller of the call gets its failure
            for chunk in batch:
                if not chunk.result.done():
                    chunk.result.set_exception(copy.copy(error))
        else:
            CALLS.labels(model.triton_name).inc()
            CHUNKS.labels(model.triton_name).inc(len(batch))
            offset = 0
            for chunk in batch:
                if not chunk.result.done():
                    chunk.result.set_result(output[offset : offset + chunk.rows])
                offset += chunk.rows
        finally:
            calls.in_flight -= 1
            self._dispatch(model, calls)

    async def _infer(self, model: EncoderModel, arrays: Mapping[str, np.ndarray], request_id: str) -> np.ndarray:
        return await self.triton.infer(model.triton_name, arrays, model.output, request_id=request_id)


def _joined(parts: list[Mapping[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """The parts' rows as one batch, each padded on the right to the widest part (with the pad
    token for input ids and zeros, i.e. masked, for the rest)."""
    width = max(part["input_ids"].shape[1] for part in parts)
    joined = {}
    for name in parts[0]:
        pad = pad_id if name == "input_ids" else 0
        rows = sum(part[name].shape[0] for part in parts)
        array = np.full((rows, width), pad, dtype=parts[0][name].dtype)
        offset = 0
        for part in parts:
            height, length = part[name].shape
            array[offset : offset + height, :length] = part[name]
            offset += height
        joined[name] = array
    return joined
