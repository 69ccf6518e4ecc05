"""Cross-request batching of encoder calls (embeddings and cross-encoder rerank) in front of Triton.

Dify embeds one text per request, and a knowledge-base import sends many such requests at once;
run one at a time, they leave most of the machine idle. Every caller's token sequences join one
queue per Triton model. A dispatcher takes up to `max_batch_size` of them in arrival order, sorts
them into sequence-length buckets, and sends each bucket to Triton as one batch padded only to its
own longest sequence, so a short text never pays for a long one's padding.

When the model has nothing in flight, queued sequences go at once: a lone request waits for
nobody. While batches are in flight (up to `max_in_flight`), new sequences gather until a batch
is full, a batch finishes, or the oldest has waited `max_queue_delay`. Under load, everything
that arrived during one batch's run becomes the next batch.

Batching does not change results: padding is masked, and each row's output depends only on its
own tokens (tested against the real model with texts of very different lengths).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog
from prometheus_client import Histogram

from modelplane.inference.tokenization import TokenSequence, pad_sequences
from modelplane.inference.triton import TritonInferer

log = structlog.get_logger()

QUEUE_SECONDS = Histogram(
    "modelplane_inference_batch_queue_seconds",
    "Time a request's sequences waited in the batching queue before the last of them was sent to Triton.",
    ["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_ROWS = Histogram(
    "modelplane_inference_batch_rows",
    "Sequences per batch the batcher dispatched (all length buckets of one dispatch together).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass(frozen=True)
class EncoderTarget:
    """A Triton encoder model and how its input tensors are laid out; one queue serves each."""

    model: str
    input_names: tuple[str, ...]
    output_name: str
    max_batch_size: int
    pad_id: int


@dataclass
class _Job:
    """One caller's sequences; done when every row has its output."""

    rows: int
    request_id: str
    enqueued: float
    future: asyncio.Future[np.ndarray]
    outputs: np.ndarray | None = None
    remaining: int = 0
    unsent: int = 0

    def __post_init__(self) -> None:
        self.remaining = self.unsent = self.rows


@dataclass(frozen=True)
class _Row:
    sequence: TokenSequence
    job: _Job
    index: int


@dataclass
class _Queue:
    target: EncoderTarget
    rows: deque[_Row] = field(default_factory=deque)
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    dispatcher: asyncio.Task[None] | None = None


class EncoderBatcher:
    def __init__(
        self,
        triton: TritonInferer,
        *,
        max_batch_size: int,
        max_queue_delay_seconds: float,
        max_in_flight: int,
        length_buckets: Sequence[int],
    ) -> None:
        self.triton = triton
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay = max(0.0, max_queue_delay_seconds)
        self.max_in_flight = max(1, max_in_flight)
        self.length_buckets = np.array(sorted(set(length_buckets)), dtype=np.int64)
        self._queues: dict[EncoderTarget, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self,
        target: EncoderTarget,
        sequences: Sequence[TokenSequence],
        *,
        request_id: str = "",
    ) -> np.ndarray:
        """The model's output for each sequence (already cut to the model's limit), in order."""
        if not sequences:
            return np.empty((0,), dtype=np.float32)
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = _Queue(target)
        loop = asyncio.get_running_loop()
        job = _Job(
            rows=len(sequences), request_id=request_id, enqueued=time.perf_counter(), future=loop.create_future()
        )
        queue.rows.extend(_Row(sequence, job, index) for index, sequence in enumerate(sequences))
        queue.changed.set()
        if queue.dispatcher is None or queue.dispatcher.done():
            queue.dispatcher = asyncio.create_task(self._dispatch(queue), name=f"batch-{target.model}")
        # A caller that goes away (deadline, client disconnect) cancels its future; its rows still
        # queued are dropped at dispatch, and rows already sent are simply not waited for.
        return await job.future

    async def close(self) -> None:
        for queue in self._queues.values():
            if queue.dispatcher is not None:
                queue.dispatcher.cancel()
        for task in [*self._tasks, *(q.dispatcher for q in self._queues.values() if q.dispatcher is not None)]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _batch_limit(self, queue: _Queue) -> int:
        return min(self.max_batch_size, queue.target.max_batch_size or self.max_batch_size)

    async def _dispatch(self, queue: _Queue) -> None:
        """Sends batches while sequences are queued, then ends (the next caller starts it again)."""
        while queue.rows:
            queue.changed.clear()
            if queue.in_flight >= self.max_in_flight:
                await queue.changed.wait()
                continue
            if queue.in_flight and len(queue.rows) < self._batch_limit(queue):
                waited = time.perf_counter() - queue.rows[0].job.enqueued
                if waited < self.max_queue_delay:
                    # Busy: let the batch fill until one finishes, it is full, or the oldest is due.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(queue.changed.wait(), self.max_queue_delay - waited)
                    continue
            rows = self._take(queue)
            if rows:
                queue.in_flight += 1
                task = asyncio.create_task(self._send(queue, rows))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take(self, queue: _Queue) -> list[_Row]:
        rows: list[_Row] = []
        now = time.perf_counter()
        limit = self._batch_limit(queue)
        while queue.rows and len(rows) < limit:
            row = queue.rows.popleft()
            if row.job.future.done():  # its caller gave up
                continue
            rows.append(row)
            row.job.unsent -= 1
            if row.job.unsent == 0:
                QUEUE_SECONDS.labels(queue.target.model).observe(now - row.job.enqueued)
        return rows

    async def _send(self, queue: _Queue, rows: list[_Row]) -> None:
        try:
            BATCH_ROWS.labels(queue.target.model).observe(len(rows))
            lengths = np.fromiter((len(row.sequence[0]) for row in rows), dtype=np.int64, count=len(rows))
            buckets = np.searchsorted(self.length_buckets, lengths, side="left")
            groups = [[rows[i] for i in np.flatnonzero(buckets == bucket)] for bucket in np.unique(buckets)]
            await asyncio.gather(*(self._infer(queue, group) for group in groups))
        finally:
            queue.in_flight -= 1
            queue.changed.set()

    async def _infer(self, queue: _Queue, rows: list[_Row]) -> None:
        target = queue.target
        arrays = pad_sequences([row.sequence for row in rows], target.input_names, target.pad_id)
        try:
            outputs = await self.triton.infer(
                target.model, arrays, target.output_name, request_id=rows[0].job.request_id
            )
        except Exception as error:  # noqa: BLE001 - every waiting caller must hear of the failure
            for row in rows:
                if not row.job.future.done():
                    row.job.future.set_exception(error)
            return
        for row, output in zip(rows, outputs, strict=True):
            job = row.job
            if job.future.done():
                continue
            if job.outputs is None:
                job.outputs = np.empty((job.rows, *output.shape), dtype=np.float32)
            job.outputs[row.index] = output
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.outputs)
