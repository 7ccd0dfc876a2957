"""The libvirt connection: open, keep alive, notice loss, reconnect, resync.

:class:`ConnectionManager.run` owns the connection for the daemon's life:

1. open (read-only unless writes are needed) in a worker thread;
2. ``registerCloseCallback`` and ``setKeepAlive(interval, count)``;
3. register every event callback (:class:`EventSubscriptions`);
4. resync guest state with one ``getAllDomainStats(STATE)`` plus the
   persistent/autostart lists, then mark the connection *ready*;
5. wait for the close callback (libvirtd died, keepalive timed out) or
   shutdown, resyncing every ``resync_interval``;
6. tear down in the order design doc §3a requires and reconnect with capped,
   jittered exponential backoff.

Components that must know whether libvirt is usable subscribe with
:meth:`ConnectionManager.add_listener`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable
from typing import Any, Protocol

import libvirt
import structlog

from ..config import LibvirtSettings
from ..infra.backoff import Backoff
from ..infra.tasks import TaskSet, notify_all
from ..infra.timing import DriftFreeSchedule, wait_event
from ..model import ResyncEntry
from .calls import Calls, CallTimeout, error_code_name
from .events import EventPump, EventSubscriptions
from .host import read_host_uuid
from .ports import VirtInstruments

log = structlog.get_logger("virtwatch.connection")

_LISTENER_FAILED = "connection_listener_failed"


class ConnectionListener(Protocol):
    """Told when the connection becomes ready and when it is lost."""

    def connection_ready(self, conn: libvirt.virConnect) -> None:
        """Connected, callbacks registered and guest state resynced."""

    def connection_lost(self) -> None:
        """The connection is gone (or being closed); drop libvirt objects now."""


def reconnect_backoff(settings: LibvirtSettings, rand: Callable[[], float] = random.random) -> Backoff:
    """Reconnect delays: doubling from ``reconnect_min_delay`` up to ``reconnect_max_delay``
    seconds, with ±20 % jitter so that many hosts do not reconnect in lockstep."""
    return Backoff(settings.reconnect_min_delay, settings.reconnect_max_delay, jitter=(0.8, 1.2), rand=rand)


def is_alive(conn: libvirt.virConnect | None) -> bool:
    """``isAlive()``: local, no RPC (the client's view of its socket); False on error or None."""
    if conn is None:
        return False
    try:
        return conn.isAlive() == 1
    except libvirt.libvirtError:
        return False


def open_connection(uri: str, read_only: bool) -> libvirt.virConnect:
    """Blocking ``virConnectOpenReadOnly`` / ``virConnectOpen``; raises libvirtError."""
    return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)


Opener = Callable[[str, bool], Any]
"""``opener(uri, read_only)`` opens a connection (blocking); raises libvirtError."""

_DENIED_CODES = frozenset(getattr(libvirt, name) for name in (
    "VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE", "VIR_ERR_ACCESS_DENIED",
    "VIR_ERR_OPERATION_DENIED") if hasattr(libvirt, name))


def is_access_denied(err: libvirt.libvirtError) -> bool:
    """Whether libvirtd refused a read-write connection for lack of rights (polkit said no,
    no polkit agent, or the socket's permissions), as opposed to libvirtd being unreachable."""
    if err.get_error_code() in _DENIED_CODES:
        return True
    return err.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and os.strerror(errno.EACCES) in str(err)


def read_guest_list(conn: libvirt.virConnect) -> list[ResyncEntry]:
    """Every guest's name, UUID, state, reason, persistence and autostart.

    Three RPCs whatever the number of guests: ``getAllDomainStats(STATE,
    NOWAIT)`` and ``listAllDomains`` filtered by PERSISTENT and AUTOSTART.
    Blocking: call from a worker thread. Raises ``libvirt.libvirtError``.
    """
    stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE,
                                   libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
    persistent = {d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)}
    autostart = {d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)}
    out = []
    for dom, st in stats:
        uuid = dom.UUIDString()
        out.append(ResyncEntry(name=dom.name(), uuid=uuid, state=int(st.get("state.state", 0)),
                               reason=int(st.get("state.reason", 0)), persistent=uuid in persistent,
                               autostart=uuid in autostart))
    return out


class ConnectionManager:
    """Owns the libvirt connection and keeps it up.

    Args:
        settings: the ``[libvirt]`` section.
        read_only: open with ``openReadOnly`` (no guest actions possible). When False and
            libvirtd refuses the read-write connection for lack of rights
            (:func:`is_access_denied`), the manager connects read-only instead, so monitoring
            goes on, and says why in :attr:`write_denied` (tried again at every connect).
        calls: bounded executor for blocking calls.
        pump: where events go; its :attr:`~EventPump.published` count marks resyncs.
        on_resync: called on the loop with every guest a resync read and the pump's
            :attr:`~EventPump.published` count when the read began
            (:meth:`~virtwatch.state.GuestRegistry.apply_resync`).
        instruments: self-metrics (``libvirt_up``, reconnects, attempts).
        rand: jitter source in [0, 1) (injected for tests).
        opener: opens a connection (:data:`Opener`; libvirt's own by default).
    """

    def __init__(self, settings: LibvirtSettings, read_only: bool, calls: Calls, pump: EventPump,
                 on_resync: Callable[[list[ResyncEntry], int], object], instruments: VirtInstruments,
                 rand: Callable[[], float] = random.random, opener: Opener | None = None) -> None:
        self.settings = settings
        self.read_only = read_only
        self.wants_write = not read_only
        self.write_denied: str | None = None
        self.denied_reported = False  # for the owner: whether it has said what the refusal stops
        self._opener = opener or open_connection
        self._calls = calls
        self._pump = pump
        self._on_resync = on_resync
        self._instruments = instruments
        self._backoff = reconnect_backoff(settings, rand)
        self._subs = EventSubscriptions(pump)
        self._listeners: list[ConnectionListener] = []
        self._conn: libvirt.virConnect | None = None
        self._closed = asyncio.Event()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.connected_once = False
        self.last_error: str | None = None
        self.info: dict[str, Any] = {}
        self.close_reason: str | None = None
        self._parked = TaskSet()
        instruments.up.set(0)

    # -- public ---------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect | None:
        """The open connection while ready, else None. Never cache it."""
        return self._conn if self.ready.is_set() else None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (teardown is orderly, not a loss)."""
        return self._stopping.is_set()

    def writable(self) -> bool:
        """False while libvirtd refuses the read-write connection this manager wanted."""
        return self.write_denied is None

    def add_listener(self, listener: ConnectionListener) -> None:
        """Register a listener for ready/lost transitions."""
        self._listeners.append(listener)

    async def run(self) -> None:
        """Connect and stay connected until :meth:`stop`; never raises."""
        attempt = 0
        while not self._stopping.is_set():
            conn = await self._connect()
            if conn is None:
                attempt += 1
                delay = self._backoff.delay(attempt)
                log.warning("libvirt_connect_failed", uri=self.settings.uri, attempt=attempt,
                            retry_in_seconds=round(delay, 3), error=self.last_error)
                await wait_event(self._stopping, delay)
                continue
            attempt = 0
            await self._serve(conn)
            await self._teardown(conn)
            if not self._stopping.is_set():
                attempt = 1
                await wait_event(self._stopping, self._backoff.delay(attempt))

    async def stop(self) -> None:
        """Ask :meth:`run` to tear down and return."""
        self._stopping.set()
        self._closed.set()

    async def reconnect(self) -> None:
        """Drop the current connection and reconnect (after the backoff's first step)."""
        self.close_reason = "requested"
        self._closed.set()

    async def resync(self) -> int:
        """Re-read every guest's state now; returns the number of guests.

        Raises ``libvirt.libvirtError`` / :class:`CallTimeout` on failure and
        RuntimeError when not connected.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("not connected")
        await self._pump.wait_idle()
        mark = self._pump.published
        entries = await self._calls.run("getAllDomainStats", read_guest_list, conn,
                                        timeout=self.settings.call_timeout)
        self._on_resync(entries, mark)
        return len(entries)

    # -- internals ------------------------------------------------------------
    def _open(self) -> tuple[libvirt.virConnect, str | None]:
        """Read-write if wanted and allowed, else read-only; with why writes were refused."""
        denied = None
        if self.wants_write:
            try:
                return self._opener(self.settings.uri, False), None
            except libvirt.libvirtError as err:
                if not is_access_denied(err):
                    raise
                denied = str(err).strip()
        return self._opener(self.settings.uri, True), denied

    async def _connect(self) -> libvirt.virConnect | None:
        try:
            conn, denied = await self._calls.run("open", self._open, timeout=self.settings.call_timeout)
        except (libvirt.libvirtError, CallTimeout) as err:
            self._instruments.connection_attempts.labels(result="failure").inc()
            self.last_error = str(err).strip()
            return None
        self.write_denied, self.read_only = denied, denied is not None or not self.wants_write
        self._instruments.connection_attempts.labels(result="success").inc()
        self._closed = asyncio.Event()
        if self._stopping.is_set():
            self._closed.set()
        self.close_reason = None
        loop = asyncio.get_running_loop()

        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            # Only signal the loop: unregistering or closing here deadlocks/leaks.
            try:
                loop.call_soon_threadsafe(self._on_close, reason)
            except RuntimeError:
                pass

        try:
            conn.registerCloseCallback(on_close, None)
            self._conn = conn
            await self._keepalive(conn)
            kinds = await self._calls.run("domainEventRegisterAny", self._subs.register, conn,
                                          timeout=self.settings.call_timeout)
            self.info = await self._calls.run("getLibVersion", _read_info, conn, timeout=self.settings.call_timeout)
            guests = await self.resync()
        except (libvirt.libvirtError, CallTimeout, RuntimeError) as err:
            self.last_error = str(err).strip()
            self._instruments.connection_attempts.labels(result="setup_failure").inc()
            await self._teardown(conn)
            return None
        log.info("libvirt_connected", uri=self.settings.uri, read_only=self.read_only,
                 events=len(kinds), unsupported_events=self._subs.unsupported,
                 guests=guests, **self.info)
        if self.connected_once:
            self._instruments.reconnects.inc()
        self.connected_once = True
        self.last_error = None
        self.ready.set()
        self._instruments.up.set(1)
        notify_all(self._listeners, lambda listener: listener.connection_ready(conn), log_event=_LISTENER_FAILED)
        return conn

    async def _keepalive(self, conn: libvirt.virConnect) -> None:
        try:
            await self._calls.run("setKeepAlive", conn.setKeepAlive, self.settings.keepalive_interval,
                                  self.settings.keepalive_count, timeout=self.settings.call_timeout,
                                  count_errors=False)
        except libvirt.libvirtError as err:
            # In-process drivers (test:///) have no keepalive: not an error.
            log.debug("keepalive_unsupported", error=error_code_name(err))

    def _on_close(self, reason: int) -> None:
        names = {libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error", libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
                 libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
                 libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client"}
        self.close_reason = names.get(reason, str(reason))
        self._closed.set()

    async def _serve(self, conn: libvirt.virConnect) -> None:
        """Wait for loss or stop; resync on a drift-free schedule; check liveness.

        Every keepalive interval ``isAlive()`` (local, no RPC) is checked too:
        when keepalive closes the socket while a call is in flight (a frozen
        libvirtd), the close callback may never arrive.
        """
        loop = asyncio.get_running_loop()
        interval = self.settings.resync_interval
        tick = float(self.settings.keepalive_interval)
        resync = DriftFreeSchedule(interval, loop.time() + interval) if interval > 0 else None
        while not self._closed.is_set():
            if await wait_event(self._closed, tick):
                break
            if not is_alive(conn):
                self.close_reason = self.close_reason or "not_alive"
                self._closed.set()
                break
            if resync is not None and loop.time() >= resync.due:
                resync.advance(loop.time())
                try:
                    await self.resync()
                except (libvirt.libvirtError, CallTimeout, RuntimeError) as err:
                    log.warning("resync_failed", error=str(err).strip())
        if not self._stopping.is_set():
            log.error("libvirt_connection_lost", uri=self.settings.uri, reason=self.close_reason)

    async def _teardown(self, conn: libvirt.virConnect) -> None:
        """Teardown order of design doc §3a: listeners drop objects, deregister
        callbacks, unregister the close callback, close.

        The connection is retired first, so no new call uses it, and closed
        only once no call on it is running: closing under a running call frees
        the connection beneath it (a segfault, seen with a frozen libvirtd).
        A connection whose calls stay stuck is parked, referenced, and closed
        in the background once they return."""
        was_ready = self.ready.is_set()
        self.ready.clear()
        self._instruments.up.set(0)
        self._calls.retire(conn)
        if was_ready:
            notify_all(self._listeners, lambda listener: listener.connection_lost(), log_event=_LISTENER_FAILED)
        timeout = min(5.0, self.settings.call_timeout)
        for call, fn in (("domainEventDeregisterAny", self._subs.deregister),
                         ("unregisterCloseCallback", _unregister_close)):
            await teardown_step(self._calls, call, fn, conn, timeout)
        self._conn = None
        if await self._calls.wait_idle(conn, timeout):
            await teardown_step(self._calls, "close", _close, conn, timeout)
            self._calls.forget(conn)
            return
        log.warning("libvirt_connection_parked", uri=self.settings.uri, calls_in_flight=self._calls.in_flight_on(conn),
                    detail="calls still inside libvirt: the connection is closed once they return")
        self._parked.spawn(self._close_when_idle(conn), name="libvirt-close-parked")

    async def _close_when_idle(self, conn: libvirt.virConnect) -> None:
        while not await self._calls.wait_idle(conn, 60.0):
            pass
        await teardown_step(self._calls, "close", _close, conn, min(5.0, self.settings.call_timeout))
        self._calls.forget(conn)
        log.info("libvirt_connection_closed_late", uri=self.settings.uri)


async def teardown_step(calls: Calls, call: str, fn: Callable[[libvirt.virConnect], Any], conn: libvirt.virConnect,
                        timeout: float) -> None:
    """Run one teardown call on ``conn`` (even when retired); a failure is only logged."""
    try:
        await calls.run(call, fn, conn, timeout=timeout, count_errors=False, allow_retired=True)
    except (libvirt.libvirtError, CallTimeout) as err:
        log.debug("teardown_step_failed", step=call, error=str(err).strip())


def _unregister_close(conn: libvirt.virConnect) -> None:
    conn.unregisterCloseCallback()


def _close(conn: libvirt.virConnect) -> None:
    conn.close()


def _read_info(conn: libvirt.virConnect) -> dict[str, Any]:
    """Version and identity of the far end (``getLibVersion``, ``getType``, ``getVersion``,
    ``getHostname``; ``host_uuid`` from :func:`~virtwatch.virt.host.read_host_uuid`)."""
    info: dict[str, Any] = {"libvirt_version": _version_str(conn.getLibVersion()), "driver": conn.getType()}
    try:
        info["hypervisor_version"] = _version_str(conn.getVersion())
    except libvirt.libvirtError:
        info["hypervisor_version"] = ""
    try:
        info["hostname"] = conn.getHostname()
    except libvirt.libvirtError:
        info["hostname"] = ""
    info["host_uuid"] = read_host_uuid(conn)
    return info


def _version_str(v: int) -> str:
    return f"{v // 1000000}.{(v // 1000) % 1000}.{v % 1000}"


class SideConnection:
    """A second connection to the same libvirtd, for one component whose calls
    may block for seconds (the guest agent: up to its response timeout; policy
    actions: a restore), so they never queue behind the statistics calls.

    libvirt 9.0's RPC client crashes (SIGSEGV in its client IO loop, under
    ``virNetClientSendWithReply``) when two threads make calls on one
    connection and it closes under them (most likely a thread's GLib socket
    watch outliving its stack frame and firing in the other thread).
    Reproduced here with a frozen libvirtd: 4 threads crash at the first
    keepalive close, 1 thread never does. So every connection has
    exactly one calling thread, and a component that may block gets its own
    connection instead of a second thread on the main one.

    It listens to the main :class:`ConnectionManager`: when that is ready it
    opens its own connection (same URI and read-only mode, with keepalive,
    no event callbacks) in ``calls`` (one worker) and tells ``listener``;
    when the main one is lost it tells ``listener`` and closes its own. A
    failed open is retried with the main connection's backoff while the main
    connection stays up.

    Args:
        name: for logs (``agent``).
        settings: the ``[libvirt]`` section.
        read_only: open read-only.
        calls: this connection's own executor (one worker).
        listener: the component using it.
        rand: jitter source in [0, 1).
        allowed: when it returns False at the main connection's ready, this one is not opened
            (a read-write side connection after libvirtd refused the main one write access).
    """

    def __init__(self, name: str, settings: LibvirtSettings, read_only: bool, calls: Calls,
                 listener: ConnectionListener, rand: Callable[[], float] = random.random,
                 allowed: Callable[[], bool] = lambda: True) -> None:
        self.name = name
        self._allowed = allowed
        self.settings = settings
        self.read_only = read_only
        self.calls = calls
        self._listener = listener
        self._backoff = reconnect_backoff(settings, rand)
        self._conn: libvirt.virConnect | None = None
        self._gen = 0
        self._tasks = TaskSet()
        self.opens = 0

    @property
    def conn(self) -> libvirt.virConnect | None:
        """The side connection while it is open, else None."""
        return self._conn

    def connection_ready(self, _main: libvirt.virConnect) -> None:
        """The main connection is ready: open ours (if ``allowed``)."""
        self._gen += 1
        if self._allowed():
            self._spawn(self._open(self._gen))

    def connection_lost(self) -> None:
        """The main connection is gone: drop and close ours."""
        self._gen += 1
        self._drop()

    async def stop(self) -> None:
        """Close the side connection (bounded by ``call_timeout``); call before the main one stops."""
        self._gen += 1
        self._tasks.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._listener.connection_lost()
            await self._close(conn)

    def _spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro, name=f"libvirt-{self.name}-connection")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            notify_all([self._listener], lambda listener: listener.connection_lost(), log_event=_LISTENER_FAILED)
            self._spawn(self._close(conn))

    async def _open(self, gen: int) -> None:
        s = self.settings
        attempt = 0
        while gen == self._gen:
            try:
                conn = await self.calls.run("open", self._open_blocking, timeout=s.call_timeout)
            except (libvirt.libvirtError, CallTimeout) as err:
                attempt += 1
                delay = self._backoff.delay(attempt)
                log.warning("libvirt_side_connect_failed", side=self.name, error=str(err).strip(),
                            retry_in_seconds=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            if gen != self._gen:  # the main connection went away meanwhile
                await self._close(conn)
                return
            try:
                await self.calls.run("setKeepAlive", conn.setKeepAlive, s.keepalive_interval, s.keepalive_count,
                                     timeout=s.call_timeout, count_errors=False)
            except (libvirt.libvirtError, CallTimeout):
                pass  # in-process drivers (test:///) have no keepalive
            self._conn = conn
            self.opens += 1
            log.info("libvirt_side_connected", side=self.name, uri=s.uri, read_only=self.read_only)
            # notify_all calls the lambda at once, inside this iteration
            notify_all([self._listener], lambda listener: listener.connection_ready(conn),  # noqa: B023
                       log_event=_LISTENER_FAILED)
            return

    def _open_blocking(self) -> libvirt.virConnect:
        return open_connection(self.settings.uri, self.read_only)

    async def _close(self, conn: libvirt.virConnect) -> None:
        # Queued on this connection's only thread: it runs after any call still
        # inside libvirt has returned, never beside it.
        await teardown_step(self.calls, "close", _close, conn, min(5.0, self.settings.call_timeout))
