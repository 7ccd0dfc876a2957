"""Waiting with a deadline, and drift-free schedules."""

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


def next_deadline(due: float, interval: float, now: float) -> tuple[float, int]:
    """The deadline after ``due`` on a drift-free schedule of ``interval`` seconds:
    ``due + k * interval`` with the smallest k >= 1 that lies after ``now``.

    Returns it and ``k - 1``, the deadlines skipped because the work overran
    them (they are never run late to catch up). Raises ValueError for ``interval <= 0``.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    nxt = due + interval
    skipped = 0
    if nxt <= now:
        skipped = int((now - nxt) // interval) + 1
        nxt += skipped * interval
        while nxt <= now:  # float rounding
            nxt += interval
            skipped += 1
    return nxt, skipped


class DriftFreeSchedule:
    """Deadlines ``start + k * interval`` on one monotonic clock: the next run is
    due one interval after the previous *deadline*, never "one interval after the
    work ended", and deadlines that passed while the work overran are skipped.

    Args:
        interval: seconds between deadlines (> 0).
        start: the first deadline, seconds on the caller's clock.

    Attributes:
        due: the next deadline.
    """

    def __init__(self, interval: float, start: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.due = start

    def restart(self, now: float) -> None:
        """Make ``now`` the next deadline (after a pause, e.g. while disconnected)."""
        self.due = now

    def advance(self, now: float) -> int:
        """Move :attr:`due` to the first deadline after ``now``; returns the deadlines skipped."""
        self.due, skipped = next_deadline(self.due, self.interval, now)
        return skipped
