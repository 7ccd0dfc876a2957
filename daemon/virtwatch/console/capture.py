"""Console capture: each selected guest's console, kept in a bounded ring buffer.

libvirt (design doc §3a) gives us the guest console as a ``virStream``
(``virDomainOpenConsole``). On libvirt 9.0 every stream that used
``virStreamEventAddCallback`` leaks (the stream, its callback data and a
reference on the connection) even after ``eventRemoveCallback``. So this
module never registers stream callbacks: each attached console is a
``VIR_STREAM_NONBLOCK`` stream read by **polling** ``recv()`` from an asyncio
task on the daemon's loop. ``recv`` on a non-blocking remote stream only
copies data the RPC client already queued (the socket itself is served by
libvirtaio) and returns ``-2`` when nothing is queued, so it never blocks the
loop. We use polling on every libvirt version: no release fixing the
callback leak has been verified here, and polling costs little with the
adaptive interval.

Per guest (:class:`GuestConsole`):

* the poll interval adapts: ``poll_interval`` while data flows, doubling up to
  ``idle_poll_interval`` while the console is quiet;
* at most ``max_read_per_tick`` bytes are read per tick (bounded CPU) into a
  ring of ``buffer_kib`` KiB (bounded memory), whatever the guest prints;
* EOF (an empty read) means the console closed: the guest stopped, or an
  operator took it with ``virsh console --force``. If the guest is still
  running we retry with capped exponential backoff (``openConsole`` without
  FORCE fails with ``VIR_ERR_OPERATION_FAILED`` while someone else holds the
  console); if it stopped we wait for its next STARTED event;
* we never steal a console unless ``force`` is set.

On a crash (lifecycle CRASHED, STOPPED/CRASHED, STOPPED/FAILED) or a watchdog
event the buffer's last ``crash_lines`` lines, the tail of the serial's
virtlogd ``<log file=...>`` (output from before we attached) and, for guests
with graphics, a screenshot are persisted in ``console.sqlite`` in the state
directory (:class:`CrashStore`). Two crash events of one guest within
``coalesce_seconds`` (CRASHED/PANICKED then STOPPED/CRASHED) make one record.

Every chunk read also goes to :attr:`ConsoleCapture.data_listeners` (the liveness monitor's
console patterns). Interfaces: :meth:`ConsoleCapture.tail` (alerting), :meth:`ConsoleCapture.state`,
:meth:`ConsoleCapture.crash` and :meth:`ConsoleCapture.crashes` (read by the HTTP
route ``GET /api/v1/guests/{name}/console`` in :mod:`virtwatch.metrics.http`);
``virtwatch console-log`` (in :mod:`virtwatch.cli.console_log`) reads ``console.sqlite`` itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import libvirt
import structlog

from ..infra.backoff import Backoff
from ..infra.tasks import TaskSet
from ..infra.timing import wait_event
from ..model import ACTIVE, Event, Kind, Lifecycle, Source, is_crash
from ..state import GuestLookup
from ..virt.calls import Calls, CallTimeout, error_code_name
from .crashstore import CrashRecord, CrashStore
from .devices import RECV_CHUNK, ConsoleDevices, open_console, read_file_tail, take_screenshot
from .ring import RingBuffer, text_lines
from .settings import ConsoleSettings

log = structlog.get_logger("virtwatch.console")

def is_crash_event(ev: Event) -> bool:
    """Events that persist the console: a crash (:func:`virtwatch.model.is_crash`) and every
    watchdog event."""
    return is_crash(ev) or (ev.source == Source.DOMAIN and ev.kind == Kind.WATCHDOG)


# -- per guest ------------------------------------------------------------------------

@dataclasses.dataclass
class GuestConsole:
    """Capture state of one guest (mutated on the loop thread only).

    Attributes:
        status: ``detached`` | ``attaching`` | ``attached`` | ``busy`` (someone
            else holds the console) | ``waiting`` (guest not running) | ``error``.
        attaches, eofs, busy_count: counters since the daemon started;
            ``ends`` counts streams that ended by EOF or a stream error.
        last_error: the last libvirt error code name or message.
        devices: log file / graphics read from the domain XML at attach time.
    """

    name: str
    ring: RingBuffer
    uuid: str = ""
    status: str = "detached"
    stream: Any = None
    task: asyncio.Task[Any] | None = None
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    attaches: int = 0
    eofs: int = 0
    ends: int = 0
    ended: bool = False
    busy_count: int = 0
    last_error: str | None = None
    devices: ConsoleDevices | None = None
    attached_at: float | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready state (no buffer contents)."""
        return {"status": self.status, "buffered_bytes": len(self.ring), "buffer_capacity_bytes": self.ring.capacity,
                "bytes_total": self.ring.total,
                "bytes_dropped": self.ring.dropped, "attaches": self.attaches, "eofs": self.eofs, "ends": self.ends,
                "busy": self.busy_count, "last_error": self.last_error,
                "log_file": self.devices.log_file if self.devices else None, "attached_at": self.attached_at}


class ConsoleCapture:
    """Captures selected guests' consoles; a connection listener and pump subscriber.

    Args:
        settings: the ``[console]`` section.
        calls: bounded executor for blocking libvirt calls (openConsole,
            abort/finish, XMLDesc, screenshot).
        guests: guest state (running or not; uuid).
        state_dir: directory of ``console.sqlite`` (created if missing); None
            keeps no crash records (tests).
        selector: optional ``name -> KiB | None``: the guest's policy
            ``console_buffer`` when its policy sets ``capture_console``, else
            None; ORed with the glob list (glob-only guests get ``buffer_kib``).
        wall: wall clock, seconds (injected for tests).
        call_timeout: deadline of each libvirt call, seconds.
        kept: the previous capture's :meth:`handover` at a reload: rings and counters go on.
        writable: False while the connection is read-only because libvirtd refused write
            access (consoles open only on read-write connections): nothing is captured.

    Wiring: ``pump.subscribe(capture.on_event)``,
    ``connection.add_listener(capture)``, ``await capture.stop()`` before the
    connection stops (every virStream is dropped there).
    """

    def __init__(self, settings: ConsoleSettings, calls: Calls, guests: GuestLookup,
                 state_dir: str | os.PathLike[str] | None, selector: Callable[[str], int | None] | None = None,
                 wall: Callable[[], float] = time.time, call_timeout: float = 10.0,
                 kept: Mapping[str, GuestConsole] | None = None,
                 writable: Callable[[], bool] = lambda: True) -> None:
        self.settings = settings
        self._writable = writable
        self._calls = calls
        self._guests = guests
        self._selector = selector
        self._wall = wall
        self._call_timeout = call_timeout
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._reattach = Backoff(settings.reattach_min_delay, settings.reattach_max_delay)
        self.store: CrashStore | None = None
        self._conn: libvirt.virConnect | None = None
        # A reload hands over each guest's ring and counters; streams are opened again.
        self._consoles = {name: dataclasses.replace(c, status="detached", stream=None, task=None,
                                                    wake=asyncio.Event(), ended=False, attached_at=None)
                          for name, c in (kept or {}).items()}
        self._crash_tasks = TaskSet()
        self._last_crash: dict[str, tuple[float, int]] = {}
        self._stopping = False
        #: called with ``(guest, bytes)`` for every chunk read (the liveness console patterns);
        #: on the loop thread, must not block.
        self.data_listeners: list[Callable[[str, bytes], None]] = []

    # -- selection -----------------------------------------------------------
    def wants(self, name: str) -> bool:
        """Whether ``name`` is captured (enabled and glob or selector match)."""
        if not self.settings.enabled or not self._writable():
            return False
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.settings.guests):
            return True
        return self._selector is not None and self._selector(name) is not None

    # -- reading ----------------------------------------------------------------
    def tail(self, name: str, lines: int | None = None) -> list[str]:
        """The last ``lines`` (default ``alert_lines``) console lines of ``name``
        from memory; [] if the guest is not captured. For alert annotations."""
        gc_ = self._consoles.get(name)
        if gc_ is None:
            return []
        if gc_.stream is not None:
            self.read_available(name)  # what arrived since the last tick (non-blocking)
        return gc_.ring.lines(self.settings.alert_lines if lines is None else lines)

    def alert_text(self, name: str) -> str | None:
        """The console text an instant alert about ``name`` carries: None unless
        ``alert_console`` opts in; else its last ``alert_lines`` lines, redacted."""
        if not self.settings.alert_console:
            return None
        return "\n".join(self.settings.redact(self.tail(name))) or None

    def state(self, name: str) -> dict[str, Any] | None:
        """Capture state of ``name`` (see :meth:`GuestConsole.summary`), None if not captured."""
        gc_ = self._consoles.get(name)
        return gc_.summary() if gc_ is not None else None

    def attached(self) -> list[str]:
        """Names of guests whose console is attached now."""
        return sorted(n for n, c in self._consoles.items() if c.stream is not None)

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Open ``console.sqlite`` if it exists (when enabled and a state dir is
        set); otherwise it is created at the first crash record. Raises
        ``sqlite3.Error``/OSError if an existing file cannot be opened."""
        if (self.settings.enabled and self._state_dir is not None and self.store is None
                and (self._state_dir / "console.sqlite").exists()):
            self.store = await asyncio.to_thread(CrashStore, self._state_dir / "console.sqlite")

    async def _writable_store(self) -> CrashStore | None:
        """The crash store, created on first use; None without a state dir or
        when it cannot be created (logged)."""
        if self.store is None and self._state_dir is not None:
            try:
                self.store = await asyncio.to_thread(CrashStore, self._state_dir / "console.sqlite")
            except (OSError, sqlite3.Error) as err:
                log.error("console_store_unavailable", path=str(self._state_dir / "console.sqlite"), error=str(err))
        return self.store

    def connection_ready(self, conn: libvirt.virConnect) -> None:
        """Connected: attach every running guest we capture."""
        self._conn = conn
        if not self.settings.enabled or self._stopping:
            return
        for g in self._guests.guests():
            if g.state in ACTIVE and self.wants(g.name):
                self._ensure(g.name).wake.set()

    def reselect(self, name: str) -> None:
        """``name``'s selection may have changed (its policy metadata was read
        or changed): attach it if it is now wanted and running; a console no
        longer wanted is let go by its supervisor."""
        if not self.settings.enabled or self._stopping:
            return
        if self.wants(name) and self._running(name):
            self._ensure(name).wake.set()
        elif name in self._consoles:
            self._consoles[name].wake.set()

    def connection_lost(self) -> None:
        """The connection is going: drop every stream now (no RPC is possible);
        supervisors wait for the next :meth:`connection_ready`."""
        self._conn = None
        for c in self._consoles.values():
            c.stream = None
            if c.status == "attached":
                c.status = "detached"
            c.wake.set()

    def on_event(self, ev: Event) -> None:
        """Pump subscriber: STARTED → attach; crash/watchdog → persist; UNDEFINED → forget."""
        if ev.source != Source.DOMAIN or not self.settings.enabled:
            return
        if ev.kind == Kind.LIFECYCLE and ev.event == Lifecycle.STARTED and self.wants(ev.name):
            c = self._ensure(ev.name)
            c.wake.set()
        if is_crash_event(ev) and ev.name in self._consoles:
            self._crash_tasks.spawn(self._persist(ev), name=f"console-crash-{ev.name}", on_done=self._crash_done)
        if ev.kind == Kind.LIFECYCLE and ev.event in (Lifecycle.STOPPED, Lifecycle.UNDEFINED):
            known = self._consoles.get(ev.name)
            if known is not None:
                known.wake.set()

    async def stop(self) -> None:
        """Detach every console (``virStreamAbort``) and drop every stream,
        finish pending crash records; call before the connection closes."""
        self._stopping = True
        await self._crash_tasks.wait(self.settings.settle + self._call_timeout)
        tasks = [c.task for c in self._consoles.values() if c.task is not None and not c.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._call_timeout)
        for c in self._consoles.values():
            await self._detach(c)
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.to_thread(store.close)

    def handover(self) -> dict[str, GuestConsole]:
        """Every guest's capture state (ring, counters), for the capture that replaces this
        one at a reload (``kept``); call after :meth:`stop`."""
        return dict(self._consoles)

    # -- attach / detach (public for tests and operators) ------------------------
    async def attach(self, name: str) -> str:
        """Open ``name``'s console once; returns the resulting status
        (``attached``, ``busy``, ``waiting`` (not running / gone) or ``error``).
        Never raises for libvirt errors (they land in ``last_error``)."""
        c = self._consoles.get(name) or self._new(name)
        if c.stream is not None:
            return c.status
        conn = self._conn
        if conn is None:
            c.status = "detached"
            return c.status
        c.status = "attaching"
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if self.settings.force else 0
        try:
            stream, devices, uuid = await self._calls.run("openConsole", open_console, conn, name,
                                                          self.settings.device, flags, timeout=self._call_timeout)
        except libvirt.libvirtError as err:
            code = err.get_error_code()
            c.last_error = error_code_name(err)
            if code == libvirt.VIR_ERR_OPERATION_FAILED:
                c.busy_count += 1
                c.status = "busy"
            elif code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                c.status = "waiting"
            else:
                c.status = "error"
            return c.status
        except CallTimeout as err:
            c.last_error = str(err)
            c.status = "error"
            return c.status
        if self._conn is not conn or self._stopping:  # lost or stopping meanwhile
            await self._abort(stream)
            c.status = "detached"
            return c.status
        c.stream, c.devices, c.uuid, c.ended = stream, devices, uuid, False
        c.attaches += 1
        c.attached_at = self._wall()
        c.status = "attached"
        c.last_error = None
        log.info("console_attached", guest=name, log_file=devices.log_file, attaches=c.attaches)
        return c.status

    async def detach(self, name: str) -> None:
        """Close ``name``'s console stream (``virStreamAbort``) if attached."""
        c = self._consoles.get(name)
        if c is not None:
            await self._detach(c)

    def read_available(self, name: str) -> int | None:
        """Read what is queued on ``name``'s stream right now, at most
        ``max_read_per_tick`` bytes, into the ring. Returns bytes read, or
        None at EOF/error (the stream is then dropped: call :meth:`detach`).
        Non-blocking: runs on the loop thread."""
        c = self._consoles.get(name)
        if c is None or c.stream is None or c.ended:
            return None
        got = 0
        while got < self.settings.max_read_per_tick:
            try:
                data = c.stream.recv(RECV_CHUNK)
            except libvirt.libvirtError as err:
                c.last_error = error_code_name(err)
                c.ends += 1
                c.ended = True
                return None
            if isinstance(data, int):  # -2: would block; -1: error
                if data == -2:
                    return got
                c.ends += 1
                c.ended = True
                return None
            if not data:
                c.eofs += 1
                c.ends += 1
                c.ended = True
                return None
            c.ring.append(data)
            got += len(data)
            for listener in self.data_listeners:
                try:
                    listener(name, data)
                except Exception as err:  # a listener must never stop the capture
                    log.error("console_listener_failed", guest=name, error=repr(err))
        return got

    # -- internals -----------------------------------------------------------------
    def _new(self, name: str) -> GuestConsole:
        kib = self._selector(name) if self._selector is not None else None
        c = GuestConsole(name=name, ring=RingBuffer((kib or self.settings.buffer_kib) * 1024))
        self._consoles[name] = c
        return c

    def _ensure(self, name: str) -> GuestConsole:
        c = self._consoles.get(name) or self._new(name)
        if (c.task is None or c.task.done()) and not self._stopping:
            c.task = asyncio.get_running_loop().create_task(self._supervise(c), name=f"console-{name}")
        return c

    def _running(self, name: str) -> bool | None:
        g = self._guests.by_name(name)
        if g is None:
            return None
        return g.state in ACTIVE

    async def _supervise(self, c: GuestConsole) -> None:
        """Attach, read until EOF, re-attach with backoff while the guest runs;
        sleep until woken (STARTED, reconnect) while it does not."""
        s = self.settings
        attempt = 0
        try:
            while not self._stopping:
                if not self.wants(c.name):
                    return
                running = self._running(c.name)
                if self._conn is None or not running:
                    if running is None and c.stream is None and c.name not in self._pending_crash_names():
                        # guest gone (transient stopped or undefined): forget it after any crash record
                        self._consoles.pop(c.name, None)
                        return
                    c.status = "waiting" if self._conn is not None else "detached"
                    c.wake.clear()
                    await c.wake.wait()
                    attempt = 0
                    continue
                status = await self.attach(c.name)
                if status != "attached":
                    attempt += 1
                    delay = self._reattach.delay(attempt)
                    log.info("console_attach_retry", guest=c.name, status=status, error=c.last_error,
                             attempt=attempt, retry_in_seconds=delay)
                    await self._sleep_or_wake(c, delay)
                    continue
                attempt = 0
                await self._pump(c)
                await self._detach(c)
                if self._stopping:
                    return
                if not self.wants(c.name):
                    log.info("console_released", guest=c.name, why="no longer selected (capture_console, guests)")
                    return
                # EOF: guest stopped (its STOPPED event follows) or someone took the console.
                await self._sleep_or_wake(c, s.reattach_min_delay)
                if self._running(c.name):
                    attempt += 1
                    c.status = "busy"
                    delay = self._reattach.delay(attempt)
                    log.info("console_lost", guest=c.name, retry_in_seconds=delay)
                    await self._sleep_or_wake(c, delay)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a supervisor must not die silently
            log.error("console_supervisor_failed", guest=c.name, error=repr(err))
            c.status = "error"
            c.last_error = repr(err)

    def _crash_done(self, task: asyncio.Task[Any]) -> None:
        c = self._consoles.get(task.get_name().removeprefix("console-crash-"))
        if c is not None:
            c.wake.set()  # let its supervisor re-check (a transient guest is gone now)

    def _pending_crash_names(self) -> set[str]:
        return {n.removeprefix("console-crash-") for n in self._crash_tasks.names()}

    async def _sleep_or_wake(self, c: GuestConsole, delay: float) -> None:
        c.wake.clear()
        await wait_event(c.wake, delay)

    async def _pump(self, c: GuestConsole) -> None:
        """Poll the stream until EOF/error/loss with an adaptive interval:
        ``poll_interval`` after a read that returned data, doubling up to
        ``idle_poll_interval`` while nothing comes."""
        s = self.settings
        interval = s.poll_interval
        while c.stream is not None and not self._stopping and self.wants(c.name):
            got = self.read_available(c.name)
            if got is None:
                return
            interval = s.poll_interval if got else min(s.idle_poll_interval, interval * 2)
            await asyncio.sleep(interval)

    async def _detach(self, c: GuestConsole) -> None:
        stream, c.stream = c.stream, None
        if c.status == "attached":
            c.status = "detached"
        if stream is not None:
            await self._abort(stream)

    async def _abort(self, stream: Any) -> None:
        if self._conn is None:
            return  # connection gone: dropping the reference is all we can do
        try:
            await self._calls.run("streamAbort", stream.abort, timeout=self._call_timeout, count_errors=False)
        except (libvirt.libvirtError, CallTimeout):
            pass

    async def _persist(self, ev: Event) -> None:
        """Write (or coalesce into) a crash record for ``ev`` after ``settle``."""
        s = self.settings
        try:
            await asyncio.sleep(s.settle)
            c = self._consoles.get(ev.name)
            if c is None:
                return
            if c.stream is not None:
                self.read_available(ev.name)  # whatever arrived since the last tick
            tail = "\n".join(c.ring.lines(s.crash_lines))
            devices = c.devices
            log_tail = None
            if s.read_log_file and devices is not None and devices.log_file:
                try:
                    raw = await asyncio.to_thread(read_file_tail, devices.log_file, s.log_file_max_bytes)
                    log_tail = "\n".join(text_lines(raw, s.crash_lines))
                except OSError as err:
                    log.warning("console_log_file_unreadable", guest=ev.name, path=devices.log_file,
                                error=str(err))
            shot = None
            if s.screenshot and devices is not None and devices.graphics and self._state_dir is not None:
                shot = await self._screenshot(ev)
            if await self._writable_store() is None:
                return
            assert self.store is not None
            prev = self._last_crash.get(ev.uuid or ev.name)
            if prev is not None and ev.time - prev[0] <= s.coalesce_seconds:
                await asyncio.to_thread(self.store.update, prev[1], ev, tail, log_tail, shot)
                crash_id = prev[1]
            else:
                crash_id = await asyncio.to_thread(self.store.insert, ev, tail,
                                                   devices.log_file if devices else None, log_tail, shot)
                await asyncio.to_thread(self.store.prune, s.keep_crashes)
            self._last_crash[ev.uuid or ev.name] = (ev.time, crash_id)
            log.warning("console_crash_recorded", guest=ev.name, crash_id=crash_id, kind=ev.kind,
                        libvirt_event=ev.event, detail=ev.detail, lines=tail.count("\n") + 1 if tail else 0)
        except Exception as err:
            log.error("console_crash_persist_failed", guest=ev.name, error=repr(err))

    async def _screenshot(self, ev: Event) -> str | None:
        conn = self._conn
        if conn is None or self._state_dir is None:
            return None
        path = self._state_dir / "screenshots" / f"{ev.name}-{int(ev.time)}-{ev.seq}.img"
        try:
            mime = await self._calls.run("screenshot", take_screenshot, conn, ev.uuid, str(path),
                                         timeout=self._call_timeout, count_errors=False)
        except (libvirt.libvirtError, CallTimeout, OSError) as err:
            log.info("console_screenshot_failed", guest=ev.name, error=str(err).strip())
            return None
        return f"{path} ({mime})"

    # -- crash records (off the loop) ----------------------------------------------
    @property
    def crash_lines(self) -> int:
        """Lines kept with a crash record (``crash_lines``); the HTTP tail's default."""
        return self.settings.crash_lines

    async def crash(self, name: str, n: int) -> CrashRecord | None:
        """The ``n``-th most recent crash record of ``name`` (1 = latest), read in a
        worker thread; None without one (or without a store yet)."""
        store = self.store
        return await asyncio.to_thread(store.crash, name, n) if store is not None else None

    async def crashes(self, name: str, limit: int = 20) -> list[CrashRecord]:
        """``name``'s crash records, newest first, at most ``limit``, read in a worker thread."""
        store = self.store
        return await asyncio.to_thread(store.crashes, name, limit) if store is not None else []
