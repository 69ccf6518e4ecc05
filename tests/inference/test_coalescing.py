"""The inference service's coalescing of encoder calls, in isolation.

Triton stands in as a recorder that answers each row with its own input ids, and that a test can
hold, so that when calls start and finish is decided by the test. The real Triton is in
tests/integration/test_batching.py; these tests pin down the queueing rules, which a real
server's timing would leave to chance."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest

from modelplane.inference.coalescing import EncoderCalls, EncoderModel
from modelplane.inference.errors import ModelLoading

MODEL = EncoderModel(triton_name="encoder", output="embeddings", max_rows=4, pad_id=9)


class HeldTriton:
    """Answers each call with its input ids as float rows, once the test releases it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.request_ids: list[str] = []
        self.release = asyncio.Event()
        self.failure: Exception | None = None

    async def infer(
        self, model: str, arrays: Mapping[str, np.ndarray], output: str, *, request_id: str = ""
    ) -> np.ndarray:
        self.calls.append(dict(arrays))
        self.request_ids.append(request_id)
        await self.release.wait()
        if self.failure is not None:
            raise self.failure
        return arrays["input_ids"].astype(np.float32)


def _chunk(*rows: list[int]) -> dict[str, np.ndarray]:
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), MODEL.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_request_is_sent_at_once_and_gets_its_rows() -> None:
    triton = HeldTriton()
    triton.release.set()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    result = await calls.run(MODEL, _chunk([1, 2, 3], [4]), request_id="r1")
    assert result.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert triton.request_ids == ["r1"]


async def test_requests_that_wait_go_together_padded_and_each_gets_its_own_rows() -> None:
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    first = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    waiting = [
        asyncio.create_task(calls.run(MODEL, _chunk([2, 2, 2]), request_id="b")),
        asyncio.create_task(calls.run(MODEL, _chunk([3], [3, 3]), request_id="c")),
    ]
    await _settle()
    assert len(triton.calls) == 1, "a second call started while the only slot was taken"
    triton.release.set()
    assert (await first).tolist() == [[1]]
    b, c = await asyncio.gather(*waiting)
    assert len(triton.calls) == 2
    joined = triton.calls[1]
    # Padded to the widest waiting chunk: the pad id for input ids, zeros (masked) for the rest.
    assert joined["input_ids"].tolist() == [[2, 2, 2], [3, 9, 9], [3, 3, 9]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert triton.request_ids[1] == "b+1"
    assert b.tolist() == [[2, 2, 2]]
    assert c.tolist() == [[3, 9, 9], [3, 3, 9]]


async def test_a_call_never_carries_more_rows_than_the_model_takes() -> None:
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    first = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    waiting = [asyncio.create_task(calls.run(MODEL, _chunk([n], [n], [n]), request_id=str(n))) for n in (2, 3, 4)]
    await _settle()
    triton.release.set()
    await asyncio.gather(first, *waiting)
    # 3 + 3 rows would pass max_rows=4: each waiting chunk of 3 goes in a call of its own.
    assert [call["input_ids"].shape[0] for call in triton.calls] == [1, 3, 3, 3]


async def test_a_caller_that_gives_up_while_waiting_is_not_sent() -> None:
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    first = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    gone = asyncio.create_task(calls.run(MODEL, _chunk([2]), request_id="gone"))
    kept = asyncio.create_task(calls.run(MODEL, _chunk([3]), request_id="kept"))
    await _settle()
    gone.cancel()
    await _settle()
    triton.release.set()
    await first
    assert (await kept).tolist() == [[3]]
    assert triton.request_ids == ["a", "kept"]


async def test_a_failed_call_fails_every_request_it_carried() -> None:
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    first = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    waiting = [asyncio.create_task(calls.run(MODEL, _chunk([n]), request_id=str(n))) for n in (2, 3)]
    await _settle()
    triton.failure = ModelLoading("Model 'encoder' is not loaded in Triton right now.", retry_after_seconds=2.0)
    triton.release.set()
    for task in (first, *waiting):
        with pytest.raises(ModelLoading, match="not loaded in Triton"):
            await task
    assert len(triton.calls) == 2
    # The queue is not wedged by the failure: the next request is sent.
    triton.failure = None
    assert (await calls.run(MODEL, _chunk([5]))).tolist() == [[5]]


async def test_with_coalescing_off_every_request_is_its_own_call() -> None:
    triton = HeldTriton()
    triton.release.set()
    calls = EncoderCalls(triton, calls_in_flight=0)  # type: ignore[arg-type]
    results = await asyncio.gather(*(calls.run(MODEL, _chunk([n]), request_id=str(n)) for n in range(5)))
    assert [result.tolist() for result in results] == [[[n]] for n in range(5)]
    assert len(triton.calls) == 5


class SendingInItsOwnTask(HeldTriton):
    """Puts each call on the wire from a task of its own, as grpc.aio's client does."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def infer(
        self, model: str, arrays: Mapping[str, np.ndarray], output: str, *, request_id: str = ""
    ) -> np.ndarray:
        async def put_on_the_wire() -> None:
            self.sent.append(request_id)

        await asyncio.create_task(put_on_the_wire())
        return await super().infer(model, arrays, output, request_id=request_id)


async def test_the_next_call_goes_out_before_the_finished_calls_callers_resume() -> None:
    """The callee is idle from the moment a call finishes until the next arrives; the callers of
    the finished call (who go on to write their answers) wait until the next one is sent."""
    triton = SendingInItsOwnTask()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    seen_when_resumed: list[list[str]] = []

    async def caller(value: int, request_id: str) -> None:
        await calls.run(MODEL, _chunk([value]), request_id=request_id)
        seen_when_resumed.append(list(triton.sent))

    first = asyncio.create_task(caller(1, "a"))
    await _settle()
    second = asyncio.create_task(caller(2, "b"))
    await _settle()
    assert triton.sent == ["a"]
    triton.release.set()
    await asyncio.gather(first, second)
    assert seen_when_resumed[0] == ["a", "b"], "the first caller resumed before the next call was sent"


async def test_a_second_call_starts_only_once_it_is_as_big_as_the_one_under_way() -> None:
    """With two calls allowed, the second goes out while the first runs (queued at the callee,
    ready when it is free) but no smaller than the first: the calls do not shrink for it."""
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=2)  # type: ignore[arg-type]
    first = asyncio.create_task(calls.run(MODEL, _chunk([1], [1]), request_id="a"))
    await _settle()
    assert len(triton.calls) == 1, "with nothing under way a call starts at once"
    waiting = [asyncio.create_task(calls.run(MODEL, _chunk([2]), request_id="b"))]
    await _settle()
    assert len(triton.calls) == 1, "one waiting row is smaller than the two-row call under way"
    waiting.append(asyncio.create_task(calls.run(MODEL, _chunk([3]), request_id="c")))
    await _settle()
    assert len(triton.calls) == 2
    assert triton.calls[1]["input_ids"].tolist() == [[2], [3]]
    triton.release.set()
    assert [(await task).tolist() for task in (first, *waiting)] == [[[1], [1]], [[2]], [[3]]]
    # Nothing under way again: a lone request is sent at once.
    assert (await calls.run(MODEL, _chunk([4]), request_id="d")).tolist() == [[4]]


class RecordingTask(HeldTriton):
    """Notes the task each call is made from."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[asyncio.Task | None] = []

    async def infer(
        self, model: str, arrays: Mapping[str, np.ndarray], output: str, *, request_id: str = ""
    ) -> np.ndarray:
        self.tasks.append(asyncio.current_task())
        return await super().infer(model, arrays, output, request_id=request_id)


async def test_a_request_that_finds_the_model_idle_is_sent_from_its_own_task() -> None:
    """The lone client's path: no task started and no future to wake between it and its call."""
    triton = RecordingTask()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    caller = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    triton.release.set()
    assert (await caller).tolist() == [[1]]
    assert triton.tasks == [caller]


async def test_a_lone_caller_that_gives_up_frees_the_slot_for_the_next() -> None:
    """Cancelling the caller of a call sent from its own task cancels that call, which nobody else
    shares, and the requests that waited behind it go out at once, together."""
    triton = HeldTriton()
    calls = EncoderCalls(triton, calls_in_flight=1)  # type: ignore[arg-type]
    lone = asyncio.create_task(calls.run(MODEL, _chunk([1]), request_id="a"))
    await _settle()
    behind = [asyncio.create_task(calls.run(MODEL, _chunk([value]), request_id=str(value))) for value in (2, 3)]
    await _settle()
    assert len(triton.calls) == 1, "the others wait while the lone call holds the slot"
    lone.cancel()
    await _settle()
    assert lone.cancelled()
    assert len(triton.calls) == 2
    assert triton.calls[1]["input_ids"].tolist() == [[2], [3]]
    triton.release.set()
    assert [(await task).tolist() for task in behind] == [[[2]], [[3]]]
