"""infra.timing: waiting for an event with a deadline, drift-free schedules."""

from __future__ import annotations

import asyncio

import pytest

from virtwatch.infra.timing import DriftFreeSchedule, next_deadline, wait_event


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


def test_next_deadline_follows_the_schedule_not_the_end_of_the_work() -> None:
    assert next_deadline(10.0, 5.0, 12.0) == (15.0, 0)    # work ended early: the next deadline as planned
    assert next_deadline(10.0, 5.0, 15.0) == (20.0, 1)    # ended on the next deadline: that one is missed
    assert next_deadline(10.0, 5.0, 33.2) == (35.0, 4)    # overran 15, 20, 25, 30: skipped, not run late
    assert next_deadline(0.0, 0.1, 0.35) == (pytest.approx(0.4), 3)  # float steps still land after now
    with pytest.raises(ValueError):
        next_deadline(0.0, 0.0, 1.0)


def test_schedule_advances_restarts_and_counts_skips() -> None:
    s = DriftFreeSchedule(15.0, 100.0)
    assert s.due == 100.0
    assert s.advance(101.0) == 0 and s.due == 115.0
    assert s.advance(147.5) == 2 and s.due == 160.0   # 130 and 145 were overrun
    s.restart(500.0)                                  # e.g. after a reconnect: due at once
    assert s.due == 500.0 and s.advance(500.0) == 0 and s.due == 515.0
