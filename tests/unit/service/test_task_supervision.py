"""Daemon task supervision: a task that ends before the daemon stops is reported at
once; tasks that end while it stops, or are cancelled, are not."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from virtwatch.app import _report_task_end


async def test_a_task_that_dies_or_returns_early_is_logged_and_a_stop_is_not() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    async def returns() -> None:
        return None

    loop = asyncio.get_running_loop()
    dead = loop.create_task(broken(), name="stats-poller")
    ended = loop.create_task(returns(), name="connection")
    cancelled = loop.create_task(asyncio.sleep(10), name="guest-agent")
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait([dead, ended, cancelled])
    with capture_logs() as logs:
        for task in (dead, ended, cancelled):
            _report_task_end(task, stopping=False)
    assert [(e["event"], e["task"], e["error"], e["log_level"]) for e in logs] == [
        ("task_failed", "stats-poller", "KeyError('bug')", "error"),
        ("task_failed", "connection", "returned", "error")]
    with capture_logs() as logs:
        for task in (dead, ended, cancelled):
            _report_task_end(task, stopping=True)  # the connection task returns at every stop
    assert logs == []
