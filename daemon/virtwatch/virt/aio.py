"""Thread-safe libvirt event-loop implementation on top of ``libvirtaio``.

libvirt calls the registered event implementation (add/update/remove handle
and timeout) from whichever thread makes an API call: the RPC client's "buck
passing" updates the socket watch and the keepalive / event-dispatch timers
from the calling thread. Stock ``libvirtaio`` touches the asyncio loop
directly from those threads, which asyncio does not allow: events arrive
seconds late, and under ``asyncio.run(debug=True)`` they are never delivered.
(Design doc §3a.)

:class:`ThreadSafeAsyncIOImpl` keeps libvirtaio's implementation and makes it
safe: every add/update/remove is appended to one ordered queue; calls made on
the loop thread flush the queue and run at once, calls from any other thread
are replayed on the loop thread with ``call_soon_threadsafe``. Handle and
timer ids are allocated synchronously, as libvirt requires, so the calling
thread gets its id back at once.

Removals after the loop has closed (objects freed at process exit) never
call libvirt's free callback: see :meth:`ThreadSafeAsyncIOImpl._submit`.

Connections opened inside :meth:`ThreadSafeAsyncIOImpl.unwatched` get no socket
watch: libvirt's RPC client then has no async IO, so their calls never touch the
loop (each call on a watched connection disables and re-enables its watch and
re-arms its keepalive timer from the calling thread: 5 calls into this
implementation per call, measured, each applied on the loop). Such a connection
receives no events and has no keepalive; the lanes use it.

It also fixes libvirtaio's timers: changing a running timer's interval
restarts its sleep (stock libvirtaio finished the old sleep first, so a 3 s
timer changed to 10 ms still fired after 3 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import libvirtaio


class _Timeout(libvirtaio.TimeoutCallback):
    """libvirtaio timer whose sleep restarts when the interval changes."""

    _task: asyncio.Future[None] | None  # set by libvirtaio.TimeoutCallback

    def update(self, timeout: int) -> None:
        """Start, stop or re-arm the timer; ``timeout`` is in ms, -1 disables."""
        if self._task is not None and timeout >= 0 and timeout != self.timeout:
            self._task.cancel()
            self._task = None
        super().update(timeout)


class ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):
    """libvirtaio's event implementation, callable from any thread.

    Construct it inside the running loop (the loop thread is remembered) and
    call :meth:`register` once per process before opening any connection.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._ops: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._known: set[int] = set()
        self._ids = itertools.count(1)
        self._flush_scheduled = False
        self._thread = threading.local()  # .unwatched: refuse socket watches on this thread
        self.dropped_after_close = 0  # removals after the loop closed whose free was left to process exit
        self.submitted_off_loop = 0  # add/update/remove calls libvirt made from other threads than the loop's

    # -- ordering machinery -------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` in call order; run now if on the loop thread.

        Once the loop is closed nothing can be dispatched any more: adds and
        updates are dropped, and removals forget the callback *without*
        freeing libvirt's opaque data (libvirt objects freed at interpreter
        exit end up here). libvirt calls remove with the object's lock held
        (``virNetSocketRemoveIOCallback``) and the free callback takes that
        same lock, so freeing here deadlocks: it hung pytest's exit in CI
        for 90 minutes. The free must come later, from the loop, and no loop
        runs any more: the data is left to the exiting process.
        """
        if self.loop.is_closed():
            removing = fn in (self._do_remove_handle, self._do_remove_timeout)
            if removing and self.callbacks.pop(args[0], None) is not None:
                self.dropped_after_close += 1
            return
        with self._lock:
            self._ops.append((fn, args))
            on_loop = threading.get_ident() == self._loop_thread
            self.submitted_off_loop += not on_loop
            schedule = not on_loop and not self._flush_scheduled
            if schedule:
                self._flush_scheduled = True
        if on_loop:
            self._flush()
        elif schedule:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # loop closed: nothing will ever run again
                pass

    def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    self._flush_scheduled = False
                    return
                fn, args = self._ops.popleft()
            fn(*args)

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        """Free libvirt's opaque data of a removed handle/timer later, on the
        loop (never inside the remove: see :meth:`_submit`). Once the loop is
        closed the data is left to the exiting process instead of failing with
        "Event loop is closed"."""
        if self.loop.is_closed():
            self.dropped_after_close += 1
            return
        super().schedule_ff_callback(iden, opaque)

    def pending_operations(self) -> int:
        """Number of queued, not yet applied add/update/remove calls."""
        with self._lock:
            return len(self._ops)

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """Open libvirt connections without a socket watch, on this thread, inside the block.

        libvirt registers a connection's socket watch from the thread that opens it
        (``virNetClientRegisterAsyncIO`` in ``virConnectOpen``); inside this block
        that registration is refused, and the remote driver goes on without async IO
        ("disabling events and support for keep-alive messages"). The connection's
        calls then do their own I/O on the calling thread and never wake the loop.
        It gets no events, and ``setKeepAlive`` on it raises ``libvirtError``
        (VIR_ERR_INTERNAL_ERROR). Watches and timers registered later, by calls
        made outside the block, are unaffected."""
        self._thread.unwatched = True
        try:
            yield
        finally:
            self._thread.unwatched = False

    # -- handles ------------------------------------------------------------
    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        if getattr(self._thread, "unwatched", False):
            return -1  # libvirt treats it as "no event loop" for this connection
        iden = self._new_id()
        self._submit(self._do_add_handle, iden, fd, event, cb, opaque)
        return iden

    def _do_add_handle(self, iden: int, fd: int, event: int, cb: Any, opaque: Any) -> None:
        callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=self.descriptors[fd], event=event)
        callback.iden = iden
        self.callbacks[iden] = callback
        self.descriptors[fd].add_handle(callback)
        self._pending_inc()

    def _update_handle(self, watch: int, event: int) -> None:
        self._submit(self._do_update_handle, watch, event)

    def _do_update_handle(self, watch: int, event: int) -> None:
        callback = self.callbacks.get(watch)
        if isinstance(callback, libvirtaio.FDCallback):
            callback.update(event=event)

    def _remove_handle(self, watch: int) -> int:
        if not self._forget(watch):
            return -1
        self._submit(self._do_remove_handle, watch)
        return 0

    def _do_remove_handle(self, watch: int) -> None:
        callback = self.callbacks.pop(watch, None)
        if callback is None:
            return
        fd = callback.descriptor.fd
        self.descriptors[fd].remove_handle(watch)
        if not self.descriptors[fd].callbacks:
            del self.descriptors[fd]
        callback.close()

    # -- timeouts -----------------------------------------------------------
    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        iden = self._new_id()
        self._submit(self._do_add_timeout, iden, timeout, cb, opaque)
        return iden

    def _do_add_timeout(self, iden: int, timeout: int, cb: Any, opaque: Any) -> None:
        callback = _Timeout(self, cb, opaque)
        callback.iden = iden
        self.callbacks[iden] = callback
        callback.update(timeout=timeout)
        self._pending_inc()

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._submit(self._do_update_timeout, timer, timeout)

    def _do_update_timeout(self, timer: int, timeout: int) -> None:
        callback = self.callbacks.get(timer)
        if isinstance(callback, libvirtaio.TimeoutCallback):
            callback.update(timeout=timeout)

    def _remove_timeout(self, timer: int) -> int:
        if not self._forget(timer):
            return -1
        self._submit(self._do_remove_timeout, timer)
        return 0

    def _do_remove_timeout(self, timer: int) -> None:
        callback = self.callbacks.pop(timer, None)
        if callback is not None:
            callback.close()

    # -- ids ----------------------------------------------------------------
    def _new_id(self) -> int:
        with self._lock:
            iden = next(self._ids)
            self._known.add(iden)
            return iden

    def _forget(self, iden: int) -> bool:
        with self._lock:
            if iden not in self._known:
                return False
            self._known.discard(iden)
            return True

    async def drain(self) -> None:
        """libvirtaio's ``drain``, safe to call again after a cancelled or
        timed-out one (stock libvirtaio leaves its ``_finished`` event set when
        the wait is cancelled, and the next ``drain`` fails its assertion)."""
        try:
            await super().drain()
        finally:
            self._finished = None

    def live_callbacks(self) -> int:
        """Handles and timers libvirt has registered and not yet removed."""
        with self._lock:
            return len(self._known)


def register_event_impl(loop: asyncio.AbstractEventLoop | None = None) -> ThreadSafeAsyncIOImpl:
    """Create and register the event implementation on the running loop.

    Must be called from a coroutine running on ``loop`` (the loop thread is
    recorded), before any ``libvirt.open*``. libvirt accepts one event
    implementation per process: call this once and share the result.

    Returns the implementation; ``await impl.drain()`` after closing every
    connection frees libvirt's remaining callbacks.
    """
    impl = ThreadSafeAsyncIOImpl(loop or asyncio.get_running_loop())
    impl.register()
    return impl


__all__ = ["ThreadSafeAsyncIOImpl", "libvirt", "register_event_impl"]
