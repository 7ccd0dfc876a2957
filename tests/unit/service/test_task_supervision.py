"""Daemon task supervision: a task that ends with an exception is reported at once."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from virtwatch.app import _report_task_end


async def test_a_daemon_task_that_dies_is_logged_at_once_and_a_cancelled_one_is_not() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    loop = asyncio.get_running_loop()
    dead = loop.create_task(broken(), name="stats-poller")
    stopped = loop.create_task(asyncio.sleep(10), name="guest-agent")
    await asyncio.sleep(0)
    stopped.cancel()
    await asyncio.wait([dead, stopped])
    with capture_logs() as logs:
        _report_task_end(dead)
        _report_task_end(stopped)
    assert [(e["event"], e["task"], e["error"], e["log_level"]) for e in logs] == [
        ("task_failed", "stats-poller", "KeyError('bug')", "error")]
