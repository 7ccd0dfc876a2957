"""Running blocking libvirt calls off the loop, bounded and with deadlines.

Every libvirt call that talks to libvirtd runs in a small thread pool so the
loop never blocks. At most ``max_in_flight`` calls run at once (libvirtd
allows 5 requests per client by default and keepalive shares that budget).
A call that outlives its deadline raises :class:`CallTimeout` in the caller,
but its thread keeps its slot until the C call really returns: a timed-out
Python wait does not cancel the C call, so freeing the slot early would let
stuck calls pile up.

A connection being torn down is *retired* first (:meth:`Calls.retire`):
calls that name it (as an argument, or as the object of a bound method) then
fail at once with :class:`ConnectionRetired` instead of queueing RPCs to a
dead socket, and the closer waits until the ones already running have
returned (:meth:`Calls.wait_idle`) before it closes, so ``close()`` never runs
beside a call on the same connection. (The segfault seen on libvirt 9.0 with
a frozen libvirtd came from several threads calling on one connection as it
closed; one calling thread per connection avoids it, see
:class:`~virtwatch.virt.connection.SideConnection`.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from .decode import constant_names
from .ports import VirtInstruments

T = TypeVar("T")


class CallTimeout(Exception):
    """A libvirt call did not return within its deadline."""

    def __init__(self, call: str, timeout: float) -> None:
        super().__init__(f"{call} did not return within {timeout:g} s")
        self.call = call
        self.timeout = timeout


class ConnectionRetired(libvirt.libvirtError):
    """The call names a connection that is being (or was) closed: not run."""

    def __init__(self, call: str) -> None:
        Exception.__init__(self, f"{call}: the libvirt connection is closed")
        self.err = None  # no libvirt error record: get_error_code() is None


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

    def __init__(self, instruments: VirtInstruments, max_in_flight: int = 4, default_timeout: float = 30.0,
                 name: str = "virtwatch-libvirt") -> None:
        self._instruments = instruments
        self._pool = DaemonThreadPool(max_in_flight, name)
        self._busy = 0
        self._lock = threading.Lock()
        self._retired: list[libvirt.virConnect] = []
        self._per_conn: dict[int, int] = {}  # id(conn) -> calls in flight naming it
        self.default_timeout = default_timeout

    @property
    def in_flight(self) -> int:
        """Calls currently running in a worker thread (including timed-out ones)."""
        with self._lock:
            return self._busy

    async def run(self, call: str, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                  count_errors: bool = True, allow_retired: bool = False) -> T:
        """Run ``fn(*args)`` in a worker thread and await its result.

        Args:
            call: the API name for metrics and logs (``getAllDomainStats``).
            timeout: seconds; default :attr:`default_timeout`.
            count_errors: count ``libvirtError`` in ``libvirt_api_errors_total``.
            allow_retired: run even when it names a retired connection (the
                closer's own teardown calls).

        Raises:
            CallTimeout: the call did not return in time (counted with code ``timeout``).
            ConnectionRetired: it names a retired connection (counted with code ``connection_closed``).
            libvirt.libvirtError: whatever libvirt raised (counted by error code).
        """
        loop = asyncio.get_running_loop()
        limit = self.default_timeout if timeout is None else timeout
        cfut = self._pool.submit(self._in_slot, call, fn, args, allow_retired)
        fut = asyncio.wrap_future(cfut, loop=loop)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the call completes, and the cancelled task would run on forever
            async with asyncio.timeout(limit):
                return await asyncio.shield(fut)
        except TimeoutError:
            # Still queued behind another call: drop it, so that callers who gave up never
            # build a backlog (one calling thread per connection). Already running: it keeps
            # its thread until the C call returns; cancelling only detaches us from it.
            cfut.cancel()  # synchronous: the worker can no longer pick it up
            fut.add_done_callback(_swallow)
            if count_errors:
                self._instruments.api_errors.labels(call=call, code="timeout").inc()
            raise CallTimeout(call, limit) from None
        except asyncio.CancelledError:
            # The caller went away (a stop): the call's outcome is nobody's, never an
            # "exception was never retrieved" traceback in the log.
            cfut.cancel()
            fut.add_done_callback(_swallow)
            raise
        except libvirt.libvirtError as err:
            if count_errors:
                code = "connection_closed" if isinstance(err, ConnectionRetired) else error_code_name(err)
                self._instruments.api_errors.labels(call=call, code=code).inc()
            raise

    async def run_when_free(self, call: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` after every call already queued or running here has
        returned, with no deadline and even on a retired connection.

        For closing a quarantined lane: with one worker the close then runs on
        the connection's own thread, strictly after its stuck call returned.
        Raises whatever ``fn`` raises; RuntimeError after :meth:`shutdown`.
        """
        return await asyncio.wrap_future(self._pool.submit(self._in_slot, call, fn, args, True))

    def retire(self, conn: libvirt.virConnect) -> None:
        """From now on, calls naming ``conn`` fail with :class:`ConnectionRetired`
        (thread-safe; the connection object is kept referenced, so it is never
        closed by garbage collection while calls may still run on it)."""
        with self._lock:
            if not any(c is conn for c in self._retired):
                self._retired.append(conn)

    def forget(self, conn: libvirt.virConnect) -> None:
        """``conn`` is closed: drop it from the retired list."""
        with self._lock:
            self._retired = [c for c in self._retired if c is not conn]

    def in_flight_on(self, conn: libvirt.virConnect) -> int:
        """Calls naming ``conn`` that are running now (stuck ones included)."""
        with self._lock:
            return self._per_conn.get(id(conn), 0)

    async def wait_idle(self, conn: libvirt.virConnect, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no call naming ``conn`` runs;
        True when none does."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.in_flight_on(conn) > 0:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.02)
        return True

    def _in_slot(self, call: str, fn: Callable[..., T], args: tuple[Any, ...], allow_retired: bool) -> T:
        conns = [a for a in (*args, getattr(fn, "__self__", None)) if isinstance(a, libvirt.virConnect)]
        with self._lock:
            if not allow_retired and any(r is c for r in self._retired for c in conns):
                raise ConnectionRetired(call)
            self._busy += 1
            for c in conns:
                self._per_conn[id(c)] = self._per_conn.get(id(c), 0) + 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy -= 1
                for c in conns:
                    left = self._per_conn[id(c)] - 1
                    if left:
                        self._per_conn[id(c)] = left
                    else:
                        del self._per_conn[id(c)]

    def shutdown(self) -> None:
        """Stop accepting calls; threads still stuck in C are left behind (they
        are daemon threads, so they never hold up the process's exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


#: One queued call of :class:`DaemonThreadPool`: its future, the call, and unused arguments.
_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonThreadPool(concurrent.futures.Executor):
    """A fixed pool of *daemon* threads.

    ``ThreadPoolExecutor`` joins its threads at interpreter exit, so one
    libvirt call that never returns (a libvirtd that died mid-request) would
    hang the daemon's exit forever. Same ``submit`` contract otherwise.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._workers = workers
        self._name = name
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; RuntimeError after :meth:`shutdown`.

        Threads start with the first submissions (up to ``workers``), so a pool
        that is never used (the agent's, with the agent off) costs no thread."""
        if self._closed:
            raise RuntimeError("pool is shut down")
        if len(self._threads) < self._workers:
            t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
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


def attempt(call: str, fn: Callable[[], Any], on_error: Callable[[str, libvirt.libvirtError], None]) -> Any:
    """``fn()``, or None when libvirt refuses it (the error goes to ``on_error(call, err)``):
    for reads where one refused call must leave only its own figures out. Blocking."""
    try:
        return fn()
    except libvirt.libvirtError as err:
        on_error(call, err)
        return None
