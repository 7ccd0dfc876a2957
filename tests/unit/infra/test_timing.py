"""infra.timing: waiting for an event with a deadline, drift-free schedules."""

from __future__ import annotations

import asyncio

import pytest

from virtwatch.infra.timing import wait_event


async def test_wait_event_says_whether_the_event_came() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_event(ev, 5.0) is True
    assert await wait_event(ev, None) is True  # already set: at once, even without a limit


async def test_wait_event_lets_a_cancellation_through() -> None:
    ev = asyncio.Event()
    task = asyncio.get_running_loop().create_task(wait_event(ev, None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
