"""Deadlines on the engine's clock: ``within`` ends a wait when fake time passes, never on real time."""

from __future__ import annotations

import asyncio

import pytest

from testkit import until
from virtwatch.policy.clock import FakeClock, within


async def test_within_returns_the_answer_and_raises_its_error() -> None:
    clock = FakeClock()

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise ValueError("no")

    assert await within(clock, 5.0, answer()) == 42
    with pytest.raises(ValueError, match="no"):
        await within(clock, 5.0, fail())
    assert clock.sleepers == 0  # the deadline's timer went away with the answer


async def hangs(cancelled: asyncio.Event) -> None:
    """Work that never ends by itself; sets ``cancelled`` when it is cancelled."""
    try:
        await asyncio.Event().wait()
    finally:
        cancelled.set()


async def test_within_times_out_on_the_clocks_time_and_cancels_the_work() -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()
    waiter = asyncio.ensure_future(within(clock, 30.0, hangs(cancelled)))
    await until(lambda: clock.sleepers == 1, 1.0, "deadline armed")  # it starts when the wait does
    assert clock.next_deadline() == 30.0
    await clock.advance(29.9)
    assert not waiter.done()  # however long that took in real time, only 29.9 s of the clock passed
    await clock.advance(0.1)
    with pytest.raises(TimeoutError, match="within 30 s"):
        await waiter
    await asyncio.wait_for(cancelled.wait(), 1.0)


async def test_cancelling_the_caller_cancels_the_work_and_is_not_swallowed() -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()
    waiter = asyncio.ensure_future(within(clock, 30.0, hangs(cancelled)))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(cancelled.wait(), 1.0)
    assert clock.sleepers == 0
