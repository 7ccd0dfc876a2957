"""Event subscription and the event pump.

libvirt delivers events by calling our callbacks on the loop thread (through
the registered event implementation). A callback only builds an
:class:`~virtwatch.model.Event` and appends it to the pump's queue;
the pump task hands each event, in arrival order, to every subscriber.

:class:`EventSubscriptions` registers every domain and host event ID the
installed libvirt offers on one connection and deregisters them again.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import libvirt
import structlog

from ..model import Event
from .decode import HOST_EVENTS, available_domain_events

Subscriber = Callable[[Event], None]

log = structlog.get_logger("virtwatch.events")


class EventPump:
    """Ordered, unbounded hand-off from libvirt callbacks to subscribers.

    ``publish_*`` methods are what libvirt callbacks call: they are cheap,
    never block and never raise (a decoding failure is logged and counted).
    :meth:`run` delivers queued events to subscribers in arrival order;
    a subscriber that raises is logged and does not stop the others.

    Args:
        loop: the loop the pump runs on (callbacks from other threads are
            moved onto it with ``call_soon_threadsafe``).
        wall_clock: returns seconds since the epoch (injected for tests).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, wall_clock: Callable[[], float] = time.time) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._clock = wall_clock
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers: list[Subscriber] = []
        self._seq = itertools.count(1)
        self.published = 0
        self.delivered = 0
        self.decode_errors = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def subscribe(self, handler: Subscriber) -> None:
        """Add a synchronous ``handler(event)``; it must not block."""
        self._subscribers.append(handler)

    def unsubscribe_all(self) -> None:
        """Drop every subscriber: a reload keeps the pump (its sequence numbers and queued
        events) and subscribes the components it builds anew."""
        self._subscribers.clear()

    @property
    def backlog(self) -> int:
        """Events queued and not yet delivered."""
        return self._queue.qsize()

    # -- producers (libvirt callbacks) ---------------------------------------
    def publish(self, source: str, kind: str, name: str, uuid: str, decoded: tuple[str, str, dict[str, Any]],
                raw: tuple[int, ...] = ()) -> None:
        """Queue one decoded event (callable from any thread)."""
        event_name, detail, payload = decoded
        ev = Event(time=self._clock(), seq=next(self._seq), source=source, kind=kind, name=name, uuid=uuid,
                   event=event_name, detail=detail, payload=payload, raw=raw)
        if threading.get_ident() == self._loop_thread:
            self._enqueue(ev)
        else:
            self._loop.call_soon_threadsafe(self._enqueue, ev)

    def _enqueue(self, ev: Event) -> None:
        self.published += 1
        self._idle.clear()
        self._queue.put_nowait(ev)

    def publish_raw(self, source: str, kind: str, obj: Any, decode: Callable[..., tuple[str, str, dict[str, Any]]],
                    args: tuple[Any, ...]) -> None:
        """Decode libvirt callback ``args`` for ``obj`` and queue the event.

        ``obj`` is the virDomain/virNetwork/... the callback received; its
        name and UUID are read locally (no RPC). Never raises.
        """
        try:
            name = obj.name()
            uuid = obj.UUIDString() if hasattr(obj, "UUIDString") else ""
            decoded = decode(*args)
            raw = tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool))
            self.publish(source, kind, name, uuid, decoded, raw if kind.endswith("lifecycle") else ())
        except Exception as err:  # a callback must never raise into libvirt
            self.decode_errors += 1
            log.error("event_decode_failed", kind=kind, error=repr(err))

    # -- consumer -----------------------------------------------------------
    async def run(self) -> None:
        """Deliver events to subscribers until cancelled."""
        while True:
            ev = await self._queue.get()
            self._deliver(ev)
            # Deliver whatever else is queued without yielding per event.
            while not self._queue.empty():
                self._deliver(self._queue.get_nowait())
            self._idle.set()

    def _deliver(self, ev: Event) -> None:
        for handler in self._subscribers:
            try:
                handler(ev)
            except Exception as err:
                log.error("event_subscriber_failed", subscriber=getattr(handler, "__qualname__", repr(handler)),
                          kind=ev.kind, name=ev.name, error=repr(err))
        self.delivered += 1

    async def wait_idle(self) -> None:
        """Return once every event published so far has been delivered."""
        await self._idle.wait()


class EventSubscriptions:
    """Every event callback registered on one connection.

    Args:
        pump: where decoded events go.

    Use :meth:`register` after each (re)connect (it runs blocking RPCs: call it
    from a worker thread) and :meth:`deregister` before closing.
    """

    def __init__(self, pump: EventPump) -> None:
        self._pump = pump
        self._domain_ids: list[int] = []
        self._host_ids: list[tuple[str, int]] = []
        self.unsupported: list[str] = []

    def register(self, conn: libvirt.virConnect) -> list[str]:
        """Subscribe to every offered event ID; returns the kinds registered.

        IDs the connected libvirtd rejects (older daemon) are skipped and
        listed in :attr:`unsupported`. Raises ``libvirt.libvirtError`` only if
        the connection itself fails.
        """
        registered = []
        self.unsupported = []
        for eid, spec in available_domain_events():
            cid = self._try(spec.kind, conn.domainEventRegisterAny, eid, self._domain_callback(spec.kind, spec.decode))
            if cid is not None:
                self._domain_ids.append(cid)
                registered.append(spec.kind)
        for host_spec in HOST_EVENTS:
            host_eid = getattr(libvirt, host_spec.id_name, None)
            method = getattr(conn, host_spec.register, None)
            if host_eid is None or method is None:
                self.unsupported.append(host_spec.kind)
                continue
            cid = self._try(host_spec.kind, method, host_eid,
                            self._host_callback(host_spec.source, host_spec.kind, host_spec.decode))
            if cid is not None:
                self._host_ids.append((host_spec.deregister, cid))
                registered.append(host_spec.kind)
        return registered

    def _try(self, kind: str, register: Callable[..., int], eid: int, cb: Callable[..., None]) -> int | None:
        """``register(None, eid, cb, None)``: the callback ID, or None (and ``kind`` listed in
        :attr:`unsupported`) when the daemon does not know that event ID."""
        try:
            return register(None, eid, cb, None)
        except libvirt.libvirtError as err:
            if err.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG,
                                        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                self.unsupported.append(kind)
                return None
            raise

    def deregister(self, conn: libvirt.virConnect) -> None:
        """Remove every callback :meth:`register` added; errors are ignored
        (a dead connection has already dropped them)."""
        for cid in self._domain_ids:
            try:
                conn.domainEventDeregisterAny(cid)
            except libvirt.libvirtError:
                pass
        for method, cid in self._host_ids:
            try:
                getattr(conn, method)(cid)
            except libvirt.libvirtError:
                pass
        self._domain_ids.clear()
        self._host_ids.clear()

    def _domain_callback(self, kind: str, decode: Callable[..., Any]) -> Callable[..., None]:
        pump = self._pump

        def callback(_conn: Any, dom: Any, *args: Any) -> None:
            pump.publish_raw("domain", kind, dom, decode, args[:-1])

        return callback

    def _host_callback(self, source: str, kind: str, decode: Callable[..., Any]) -> Callable[..., None]:
        pump = self._pump

        def callback(_conn: Any, obj: Any, *args: Any) -> None:
            pump.publish_raw(source, kind, obj, decode, args[:-1])

        return callback


def event_kinds() -> Iterable[str]:
    """Every event kind this libvirt-python can deliver (domain and host)."""
    return [spec.kind for _, spec in available_domain_events()] + [s.kind for s in HOST_EVENTS]
