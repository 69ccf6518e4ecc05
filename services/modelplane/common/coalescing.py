"""Calls that go together when they arrive together.

Dify sends one text per embedding request, and a knowledge-base import sends many at once. Each
request that crosses a process boundary on its own pays that hop's whole cost (a gRPC call, its
log line, the callee's handling), which at 16 concurrent clients was a quarter of the CPU spent
on each text (docs/BATCHING.md). A `Coalescer` keeps at most `calls_in_flight` calls per key (a
model) under way. An item that arrives while that many are running waits; when one finishes,
every waiting item, up to the call's size limit, goes as one call. With no call under way nothing
is held back, so a lone client's latency does not change. A call beside others under way starts
only once the waiting items make a call as big as the smallest of them (or a full one): it is then
queued at the callee while the callee works, ready the moment it is free, and the calls do not
get smaller for it (greedy second calls carried 5.3 requests instead of 8 at 16 clients). Items
are never split, each caller gets its own result, and a caller that gives up (deadline,
disconnect) before its item is sent takes the item out of the queue.

The gateway coalesces Embed calls to the inference service, and the inference service coalesces
encoder calls to Triton, each with its own `send` that joins the items into one call and splits
the answer.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram

KeyT = TypeVar("KeyT", bound=Hashable)
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# One call's results, in the order of its items: a result, or the error that item alone gets.
Send = Callable[[KeyT, list[ItemT]], Awaitable[list[ResultT | BaseException]]]


@dataclass(frozen=True)
class CoalescingMetrics:
    """Each item's wait for a call slot, and the calls and items sent, labelled by `label(key)`."""

    wait_seconds: Histogram
    calls: Counter
    items: Counter


def coalescing_metrics(prefix: str, what: str) -> CoalescingMetrics:
    return CoalescingMetrics(
        wait_seconds=Histogram(
            f"{prefix}_wait_seconds",
            f"Time {what} waited for a free call slot before it was sent.",
            ["model"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        ),
        calls=Counter(
            f"{prefix}_calls_total",
            f"Calls made for {what}; items_total / calls_total is how many went in each call.",
            ["model"],
        ),
        items=Counter(f"{prefix}_items_total", f"{what} sent, in calls alone or together.", ["model"]),
    )


@dataclass
class _Waiting(Generic[ItemT, ResultT]):
    item: ItemT
    size: int
    result: asyncio.Future[ResultT]
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _KeyCalls(Generic[ItemT, ResultT]):
    waiting: collections.deque[_Waiting[ItemT, ResultT]] = field(default_factory=collections.deque)
    in_flight: list[int] = field(default_factory=list)  # the size of each call under way


class Coalescer(Generic[KeyT, ItemT, ResultT]):
    def __init__(
        self,
        send: Send[KeyT, ItemT, ResultT],
        *,
        calls_in_flight: int,
        metrics: CoalescingMetrics,
        label: Callable[[KeyT], str] = str,
    ) -> None:
        """`calls_in_flight` <= 0 sends every item as a call of its own, at once."""
        self.send = send
        self.calls_in_flight = calls_in_flight
        self.metrics = metrics
        self.label = label
        self._keys: dict[KeyT, _KeyCalls[ItemT, ResultT]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, key: KeyT, item: ItemT, *, size: int, limit: int) -> ResultT:
        """`item`'s result. `size` is what it counts toward `limit`, the most one call may carry."""
        if self.calls_in_flight <= 0:
            (result,) = await self.send(key, [item])
            if isinstance(result, BaseException):
                raise result
            return result
        calls = self._keys.setdefault(key, _KeyCalls())
        if not calls.in_flight and not calls.waiting and not self._closed:
            return await self._alone(key, calls, item, size, limit)
        waiting = _Waiting[ItemT, ResultT](item, size, asyncio.get_running_loop().create_future())
        calls.waiting.append(waiting)
        self._dispatch(key, calls, limit)
        # Cancelling this caller cancels the future too, and _dispatch skips a cancelled item.
        return await waiting.result

    async def _alone(self, key: KeyT, calls: _KeyCalls[ItemT, ResultT], item: ItemT, size: int, limit: int) -> ResultT:
        """An item that finds its key idle goes at once as a call of its own, sent from the caller's
        own task: no task to start and no future to wake, which on a lone client's request path is
        a good part of what coalescing would cost it. It holds the call slot like any call, so
        items that arrive meanwhile wait and go together when it ends; cancelling the caller
        cancels the call, which nobody else shares."""
        self._count_call(self.label(key), [0.0])
        calls.in_flight.append(size)
        try:
            (result,) = await self.send(key, [item])
        finally:
            calls.in_flight.remove(size)
            sent_next = self._dispatch(key, calls, limit)
        if sent_next:
            # The next call goes out before this caller answers (see _call): a turn for its task to
            # start, and one for the call to reach the wire (grpc.aio writes from a task of its own),
            # as many as a caller woken by _call's future waits.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        if isinstance(result, BaseException):
            raise result
        return result

    async def close(self) -> None:
        self._closed = True
        for calls in self._keys.values():
            while calls.waiting:
                calls.waiting.popleft().result.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _dispatch(self, key: KeyT, calls: _KeyCalls[ItemT, ResultT], limit: int) -> bool:
        """Starts calls while a slot is free, each with every waiting item that fits; whether it
        started any."""
        started = False
        while calls.waiting and len(calls.in_flight) < self.calls_in_flight and not self._closed:
            if calls.in_flight and _waiting_size(calls.waiting) < min(min(calls.in_flight), limit):
                return started  # a call beside one under way waits to be as big as it (see above)
            batch: list[_Waiting[ItemT, ResultT]] = []
            total = 0
            while calls.waiting and (not batch or total + calls.waiting[0].size <= limit):
                waiting = calls.waiting.popleft()
                if waiting.result.done():  # its caller gave up while it waited
                    continue
                batch.append(waiting)
                total += waiting.size
            if not batch:
                return started
            calls.in_flight.append(total)
            started = True
            task = asyncio.create_task(
                self._call(key, calls, batch, total, limit), name=f"coalesced-call-{self.label(key)}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return started

    async def _call(
        self,
        key: KeyT,
        calls: _KeyCalls[ItemT, ResultT],
        batch: list[_Waiting[ItemT, ResultT]],
        size: int,
        limit: int,
    ) -> None:
        started = time.monotonic()
        self._count_call(self.label(key), [started - waiting.queued_at for waiting in batch])
        try:
            results = await self.send(key, [waiting.item for waiting in batch])
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.result.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every caller in the call gets its failure
            results = [copy.copy(error) for _ in batch]
        finally:
            calls.in_flight.remove(size)
            sent_next = self._dispatch(key, calls, limit)
        if sent_next:
            # One turn of the loop for the next call to go out before this call's callers wake
            # (each then writes its answer): the callee, idle now, gets its next work sooner.
            await asyncio.sleep(0)
        for waiting, result in zip(batch, results, strict=True):
            if waiting.result.done():
                continue
            if isinstance(result, BaseException):
                waiting.result.set_exception(result)
            else:
                waiting.result.set_result(result)

    def _count_call(self, label: str, waited: list[float]) -> None:
        """One call's metrics: how long each of its items waited for it, and how many went."""
        for seconds in waited:
            self.metrics.wait_seconds.labels(label).observe(seconds)
        self.metrics.calls.labels(label).inc()
        self.metrics.items.labels(label).inc(len(waited))


def _waiting_size(waiting: collections.deque[_Waiting[ItemT, ResultT]]) -> int:
    return sum(item.size for item in waiting if not item.result.done())
