"""wait_set: a cancellation that comes with the event is raised, not taken for the event (as
Python 3.11's asyncio.wait_for does), so a loop that waits on an event stops when cancelled."""

from __future__ import annotations

import asyncio

import pytest

from modelplane.common.waiting import wait_set


async def _waiting_forever(event: asyncio.Event) -> None:
    while True:  # a service's loop: wait for a change or the interval, do a round, again
        await wait_set(event, 60.0)
        event.clear()


async def test_a_cancellation_in_the_turn_the_event_is_set_stops_the_loop() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(_waiting_forever(event))
    await asyncio.sleep(0)  # the loop waits
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_the_event_or_the_time_limit() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 0.01) is True
