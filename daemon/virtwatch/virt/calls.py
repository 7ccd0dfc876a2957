"""Running blocking libvirt calls off the loop, bounded and with deadlines.

Every libvirt call that talks to libvirtd runs in a small thread pool so the
loop never blocks. At most ``max_in_flight`` calls run at once (libvirtd
allows 5 requests per client by default and keepalive shares that budget).
A call that outlives its deadline raises :class:`CallTimeout` in the caller,
but its thread keeps its slot until the C call really returns: a timed-out
Python wait does not cancel the C call, so freeing the slot early would let
stuck calls pile up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable, TypeVar

import libvirt

from ..metrics.instruments import Instruments
from .decode import constant_names

T = TypeVar("T")


class CallTimeout(Exception):
    """A libvirt call did not return within its deadline."""

    def __init__(self, call: str, timeout: float) -> None:
        super().__init__(f"{call} did not return within {timeout:g} s")
        self.call = call
        self.timeout = timeout


def error_code_name(err: libvirt.libvirtError) -> str:
    """libvirt error code of ``err`` as its constant name, e.g. ``VIR_ERR_NO_DOMAIN``."""
    code = err.get_error_code()
    if code is None:
        return "unknown"
    name = constant_names("VIR_ERR_").get(code)
    return f"VIR_ERR_{name}" if name else str(code)


class Calls:
    """Bounded executor for blocking libvirt calls.

    Args:
        instruments: where ``libvirt_api_errors_total`` is counted.
        max_in_flight: concurrent calls (threads); ``libvirt.max_calls_in_flight``.
        default_timeout: deadline in seconds when a call gives none.
    """

    def __init__(self, instruments: Instruments, max_in_flight: int = 4, default_timeout: float = 30.0) -> None:
        self._instruments = instruments
        self._pool = DaemonThreadPool(max_in_flight, "virtwatch-libvirt")
        self._busy = 0
        self._lock = threading.Lock()
        self.default_timeout = default_timeout

    @property
    def in_flight(self) -> int:
        """Calls currently running in a worker thread (including timed-out ones)."""
        with self._lock:
            return self._busy

    async def run(self, call: str, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                  count_errors: bool = True) -> T:
        """Run ``fn(*args)`` in a worker thread and await its result.

        Args:
            call: the API name for metrics and logs (``getAllDomainStats``).
            timeout: seconds; default :attr:`default_timeout`.
            count_errors: count ``libvirtError`` in ``libvirt_api_errors_total``.

        Raises:
            CallTimeout: the call did not return in time (counted with code ``timeout``).
            libvirt.libvirtError: whatever libvirt raised (counted by error code).
        """
        loop = asyncio.get_running_loop()
        limit = self.default_timeout if timeout is None else timeout
        fut = loop.run_in_executor(self._pool, self._in_slot, fn, args)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the call completes, and the cancelled task would run on forever
            async with asyncio.timeout(limit):
                return await asyncio.shield(fut)
        except TimeoutError:
            fut.add_done_callback(_swallow)
            if count_errors:
                self._instruments.api_errors.labels(call=call, code="timeout").inc()
            raise CallTimeout(call, limit) from None
        except libvirt.libvirtError as err:
            if count_errors:
                self._instruments.api_errors.labels(call=call, code=error_code_name(err)).inc()
            raise

    def _in_slot(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            self._busy += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy -= 1

    def shutdown(self) -> None:
        """Stop accepting calls; threads still stuck in C are left behind (they
        are daemon threads, so they never hold up the process's exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class DaemonThreadPool(concurrent.futures.Executor):
    """A fixed pool of *daemon* threads.

    ``ThreadPoolExecutor`` joins its threads at interpreter exit, so one
    libvirt call that never returns (a libvirtd that died mid-request) would
    hang the daemon's exit forever. Same ``submit`` contract otherwise.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: "queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]" = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        """Schedule ``fn(*args, **kwargs)``; RuntimeError after :meth:`shutdown`."""
        if self._closed:
            raise RuntimeError("pool is shut down")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fut, (lambda: fn(*args, **kwargs)), ()))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, _ = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as err:  # delivered to the awaiting coroutine
                fut.set_exception(err)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers once the queue is drained (or cancel what is queued)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:  # bounded: a thread stuck in a C call must not hang the process
            deadline = time.monotonic() + 2.0
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
