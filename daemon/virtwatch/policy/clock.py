"""Time as a port: :class:`Clock` protocol, the real :class:`SystemClock`, and :class:`FakeClock` for tests.

``monotonic()`` schedules delays; ``time()`` (seconds since the epoch) is what
gets persisted (monotonic time does not survive a reboot). ``sleep()`` waits on
the clock's own time, and :func:`within` puts a deadline on the clock's time,
so a fake clock controls the engine's timers and deadlines alike.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time as _time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    """Source of time for the policy engine."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (scheduling)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (persisted timestamps)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time (<= 0: just yield)."""


async def within(clock: Clock, seconds: float, aw: Awaitable[T]) -> T:
    """``await aw``, for at most ``seconds`` of ``clock``'s time; returns its result or raises its error.

    ``aw`` runs as a task of its own, raced against ``clock.sleep(seconds)``:
    when the sleep ends first, the task is cancelled and TimeoutError is
    raised. Cancelling the caller cancels the task too (and is never
    swallowed, unlike 3.11's ``asyncio.wait_for``).
    """
    work = asyncio.ensure_future(aw)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not work.done():
            work.cancel()
            work.add_done_callback(_retrieve)  # what it raises on its way out is of no interest now
    if work.done():
        return work.result()
    raise TimeoutError(f"no answer within {seconds:g} s")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time``, ``asyncio.sleep``."""

    def monotonic(self) -> float:
        """See :meth:`Clock.monotonic`."""
        return _time.monotonic()

    def time(self) -> float:
        """See :meth:`Clock.time`."""
        return _time.time()

    async def sleep(self, seconds: float) -> None:
        """See :meth:`Clock.sleep`."""
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Manual clock: time moves only by :meth:`advance`. Sleepers wake in deadline order.

    ``start_time`` is the wall-clock value at monotonic 0. ``settle`` is awaited
    after each wake-up and at the end of :meth:`advance` (default: yield to the
    loop 20 times); pass one that also waits for work in other threads (a
    store's writes) so that a sleeper has finished reacting before time moves on.

    It is also a plain wall clock (``clock()`` and :attr:`t` are :meth:`time`) for code that
    takes ``Callable[[], float]`` plus a ``sleep`` (the alerter); :attr:`sleeps` lists every
    sleep asked for, in seconds.
    """

    def __init__(self, start_time: float = 1_800_000_000.0,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        self._mono = 0.0
        self._offset = start_time
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()
        self._settle = settle or _yield_20
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """Current fake monotonic seconds."""
        return self._mono

    def time(self) -> float:
        """Current fake wall-clock seconds."""
        return self._offset + self._mono

    __call__ = time

    @property
    def t(self) -> float:
        """Current fake wall-clock seconds (:meth:`time`)."""
        return self.time()

    async def sleep(self, seconds: float) -> None:
        """Wait until :meth:`advance` moves time past now + ``seconds``."""
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._ids), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """Number of pending (not cancelled) sleeps."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """Monotonic deadline of the earliest pending sleep, or None."""
        live = [d for d, _, f in self._sleepers if not f.done()]
        return min(live) if live else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking due sleepers in order and letting them run."""
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self._mono = max(self._mono, deadline)
            fut.set_result(None)
            await self._settle()
        self._mono = target
        await self._settle()


async def _yield_20() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
