"""The batcher's dispatch policy: who waits for whom, what goes into one batch, what happens on failure.

These tests need Triton to pause on command and to say exactly which rows it received together,
which the real server cannot do; `RecordingTriton` stands in for `TritonInferer` and computes each
row's output from that row's own tokens only, as a real encoder does. That outputs do not depend
on the batch with the real model is tested end to end in tests/integration/test_batching.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest

from modelplane.inference.batching import QUEUE_SECONDS, EncoderBatcher, EncoderTarget
from modelplane.inference.errors import TritonUnavailable

TARGET = EncoderTarget(
    model="encoder", input_names=("input_ids", "attention_mask"), output_name="out", max_batch_size=64, pad_id=0
)


class RecordingTriton:
    """Answers each row with (sum of its ids, its length); holds calls while `gate` is closed."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None

    async def infer(self, model: str, arrays: Mapping[str, np.ndarray], output: str, **_: object) -> np.ndarray:
        self.calls.append(dict(arrays))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        mask = arrays["attention_mask"]
        return np.stack([(arrays["input_ids"] * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)


def sequence(length: int, start: int = 1) -> tuple[list[int], list[int]]:
    return list(range(start, start + length)), [0] * length


def expected(length: int, start: int = 1) -> list[float]:
    return [float(sum(range(start, start + length))), float(length)]


def batcher(triton: RecordingTriton, **overrides: object) -> EncoderBatcher:
    options: dict = {"max_batch_size": 64, "max_queue_delay_seconds": 0.002, "max_in_flight": 1}
    options.update(overrides)
    return EncoderBatcher(triton, length_buckets=[16, 32, 64], **options)  # type: ignore[arg-type]


async def test_a_lone_request_is_sent_at_once_and_answered_in_order() -> None:
    triton = RecordingTriton()
    outputs = await asyncio.wait_for(batcher(triton).run(TARGET, [sequence(5), sequence(3, start=7)]), 1)
    assert outputs.tolist() == [expected(5), expected(3, start=7)]
    assert len(triton.calls) == 1


async def test_requests_that_arrive_while_the_model_is_busy_share_the_next_batch() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton)
    triton.gate.clear()
    first = asyncio.create_task(encoder.run(TARGET, [sequence(4)]))
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(encoder.run(TARGET, [sequence(4, start=i)])) for i in range(10, 20)]
    await asyncio.sleep(0.01)
    assert len(triton.calls) == 1  # the others wait for the running batch: one model in flight
    triton.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *others), 1)
    assert len(triton.calls) == 2 and triton.calls[1]["input_ids"].shape == (10, 4)
    assert [r.tolist() for r in results[1:]] == [[expected(4, start=i)] for i in range(10, 20)]


async def test_a_batch_holds_one_length_bucket_padded_to_its_own_longest() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton)
    triton.gate.clear()
    blocker = asyncio.create_task(encoder.run(TARGET, [sequence(2)]))
    await asyncio.sleep(0.01)
    lengths = [3, 40, 12, 20, 7, 31, 60]
    waiting = [asyncio.create_task(encoder.run(TARGET, [sequence(n)])) for n in lengths]
    await asyncio.sleep(0.01)
    triton.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiting), 1)
    await blocker
    widths = sorted(call["input_ids"].shape[1] for call in triton.calls[1:])
    assert widths == [12, 31, 60]  # buckets <=16, <=32, <=64, each cut to its longest row
    assert [r.tolist() for r in results] == [[expected(n)] for n in lengths]


async def test_batches_never_exceed_the_limit_and_a_large_request_spans_several() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton, max_batch_size=8)
    outputs = await asyncio.wait_for(encoder.run(TARGET, [sequence(1 + i % 5, start=i) for i in range(30)]), 1)
    assert max(call["input_ids"].shape[0] for call in triton.calls) <= 8
    assert sum(call["input_ids"].shape[0] for call in triton.calls) == 30
    assert outputs.tolist() == [expected(1 + i % 5, start=i) for i in range(30)]


async def test_the_models_own_batch_limit_caps_the_setting() -> None:
    triton = RecordingTriton()
    small = EncoderTarget(**{**TARGET.__dict__, "max_batch_size": 4})
    await asyncio.wait_for(batcher(triton).run(small, [sequence(3)] * 10), 1)
    assert [call["input_ids"].shape[0] for call in triton.calls] == [4, 4, 2]


async def test_with_two_in_flight_a_busy_model_waits_at_most_the_queue_delay() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton, max_in_flight=2, max_queue_delay_seconds=0.05)
    triton.gate.clear()
    first = asyncio.create_task(encoder.run(TARGET, [sequence(3)]))
    await asyncio.sleep(0.005)
    second = asyncio.create_task(encoder.run(TARGET, [sequence(3)]))
    await asyncio.sleep(0.01)
    assert len(triton.calls) == 1  # held back: the model is busy and the delay has not passed
    await asyncio.sleep(0.08)
    assert len(triton.calls) == 2  # sent once the oldest waited the delay, without the first finishing
    triton.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)


async def test_a_failure_reaches_every_caller_in_the_batch_and_the_next_batch_still_runs() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton)
    triton.fail_with = TritonUnavailable("Triton is not reachable; retry shortly.")
    results = await asyncio.gather(*(encoder.run(TARGET, [sequence(3)]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, TritonUnavailable) and "not reachable" in r.message for r in results)
    triton.fail_with = None
    assert (await asyncio.wait_for(encoder.run(TARGET, [sequence(3)]), 1)).tolist() == [expected(3)]


async def test_a_caller_that_gives_up_loses_its_queued_rows_not_the_others() -> None:
    triton = RecordingTriton()
    encoder = batcher(triton)
    triton.gate.clear()
    blocker = asyncio.create_task(encoder.run(TARGET, [sequence(2)]))
    await asyncio.sleep(0.01)
    leaving = asyncio.create_task(encoder.run(TARGET, [sequence(9, start=100)] * 5))
    staying = asyncio.create_task(encoder.run(TARGET, [sequence(4)]))
    await asyncio.sleep(0.01)
    leaving.cancel()
    triton.gate.set()
    assert (await asyncio.wait_for(staying, 1)).tolist() == [expected(4)]
    await blocker
    assert triton.calls[1]["input_ids"].shape == (1, 4)  # the cancelled caller's rows were never sent
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_queue_time_is_exported_once_per_request() -> None:
    target = EncoderTarget(**{**TARGET.__dict__, "model": "queue-metric"})
    triton = RecordingTriton()
    encoder = batcher(triton, max_batch_size=2)
    await asyncio.wait_for(
        asyncio.gather(encoder.run(target, [sequence(3)] * 5), encoder.run(target, [sequence(2)])), 1
    )
    samples = {s.name: s.value for s in QUEUE_SECONDS.collect()[0].samples if s.labels.get("model") == "queue-metric"}
    assert samples["modelplane_inference_batch_queue_seconds_count"] == 2
    assert samples["modelplane_inference_batch_queue_seconds_sum"] > 0
