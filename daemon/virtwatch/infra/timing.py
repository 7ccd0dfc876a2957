"""Waiting with a deadline."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (None: no limit).

    Returns True when the event was set, False when the time ran out. A
    cancellation always propagates: this uses ``asyncio.timeout``, not
    ``wait_for``, which on Python 3.11 can swallow a cancellation that arrives as
    the awaited thing completes.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
