"""What the domain XML says about a guest's NICs and balloon, cached per guest.

The bulk statistics (``getAllDomainStats``) name a NIC only by its host-side
device (``net.<i>.name``, the tap: ``vnet12``), which libvirt never reuses:
keyed by it, every guest restart or NIC hot-plug would start new series.
The live domain XML (``virDomainGetXMLDesc(0)``) has what stays: each
``<interface>``'s ``<alias name=...>`` (``net0``, or a user alias ``ua-...``,
kept across restarts) and ``<mac address=...>``, next to ``<target dev=...>``
(the tap), ``<source>`` and ``<model>``; and the balloon's statistics period
(``<memballoon><stats period='N'/>``), which tells whether the guest-reported
memory figures are current (:func:`guest_memory_stale`).

:class:`DeviceCache` keeps one parsed :class:`DomainDevices` per guest UUID.
It is a pump subscriber: lifecycle and device events mark a guest for a new
read; the stats poller asks :meth:`DeviceCache.wanted` which guests need one
and reads their XML on the stats lane (:func:`read_devices`, blocking, never
on the loop). ``XMLDesc`` is answered from libvirtd's copy of the definition
and does not talk to QEMU (on QEMU with balloon events, libvirt ≥ 1.2),
so a hung guest cannot hold it.
"""

from __future__ import annotations

import dataclasses
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import libvirt
import structlog

from ..model import Event, Kind, Lifecycle, Source
from .calls import CallTimeout
from .lanes import LanePool, LaneUnavailable

log = structlog.get_logger("virtwatch.devices")

#: Guest-reported memory figures of the balloon group (``VIR_DOMAIN_STATS_BALLOON``): what the
#: guest's balloon driver last told QEMU. ``balloon.current``, ``.maximum`` and ``.rss`` are
#: host-side and always current; ``balloon.last-update`` is when the guest last reported.
GUEST_MEMORY_KEYS = ("balloon.unused", "balloon.available", "balloon.usable", "balloon.disk_caches",
                     "balloon.swap_in", "balloon.swap_out", "balloon.major_fault", "balloon.minor_fault",
                     "balloon.hugetlb_pgalloc", "balloon.hugetlb_pgfail")

#: Lifecycle events after which the live XML may differ (new taps and aliases after any start,
#: restore or incoming migration; a new definition).
_REREAD_LIFECYCLE = frozenset({Lifecycle.DEFINED, Lifecycle.STARTED})
#: Events after which the guest's entry is useless.
_FORGET_LIFECYCLE = frozenset({Lifecycle.STOPPED, Lifecycle.UNDEFINED, Lifecycle.CRASHED})
_DEVICE_KINDS = frozenset({"device_added", "device_removed"})


@dataclasses.dataclass(frozen=True, slots=True)
class Interface:
    """One ``<devices><interface>`` of a live domain XML; "" where the XML has nothing.

    Attributes:
        alias: ``<alias name>`` (``net0``; user aliases start with ``ua-``); only running
            guests on drivers that assign aliases (QEMU) have one.
        mac: ``<mac address>``, lower case.
        target: ``<target dev>``, the host-side device (tap) while running.
        type: the interface type (``network``, ``bridge``, ``direct``, ``ethernet``...).
        source: ``<source network|bridge|dev|...>`` (the network name for ``network``).
        bridge: the host bridge the tap is on (``<source bridge>``, also filled in for
            ``network`` interfaces of running guests).
        model: ``<model type>`` (``virtio``, ``e1000e``...).
    """

    alias: str
    mac: str
    target: str
    type: str
    source: str
    bridge: str
    model: str

    @property
    def key(self) -> str:
        """The stable series key: the alias, else the MAC, else (neither: not seen on
        libvirt, which always generates a MAC) the target."""
        return self.alias or self.mac or self.target


@dataclasses.dataclass(frozen=True, slots=True)
class DomainDevices:
    """The parts of one guest's live XML the poller needs.

    Attributes:
        interfaces: every ``<interface>``, in XML order.
        balloon_period: ``<memballoon><stats period>`` in seconds; 0 when the balloon has
            no statistics period (none set, or set to 0), None without a balloon.
    """

    interfaces: tuple[Interface, ...] = ()
    balloon_period: int | None = None

    def interface(self, name: str) -> Interface | None:
        """The interface a bulk-stats ``net.<i>.name`` refers to: its target (tap) as on
        QEMU, or else an alias or MAC equal to ``name``; None when none matches."""
        for nic in self.interfaces:
            if nic.target and nic.target == name:
                return nic
        for nic in self.interfaces:
            if name in (nic.alias, nic.mac):
                return nic
        return None


def parse_devices(xml: str) -> DomainDevices:
    """Parse the ``<interface>`` elements and the balloon period of a domain XML (``XMLDesc``).

    Raises ``xml.etree.ElementTree.ParseError`` for malformed XML.
    """
    root = ET.fromstring(xml)
    nics = []
    for el in root.findall("./devices/interface"):
        def attr(path: str, name: str, el: ET.Element = el) -> str:
            sub = el.find(path)
            return (sub.get(name) or "") if sub is not None else ""
        src = el.find("source")
        source = ""
        if src is not None:
            for name in ("network", "bridge", "dev", "path", "name"):
                if src.get(name):
                    source = src.get(name) or ""
                    break
        nics.append(Interface(alias=attr("alias", "name"), mac=attr("mac", "address").lower(),
                              target=attr("target", "dev"), type=el.get("type") or "", source=source,
                              bridge=attr("source", "bridge"), model=attr("model", "type")))
    period: int | None = None
    balloon = root.find("./devices/memballoon")
    if balloon is not None and balloon.get("model") != "none":
        stats = balloon.find("stats")
        try:
            period = max(0, int(stats.get("period") or 0)) if stats is not None else 0
        except ValueError:
            period = 0
    return DomainDevices(interfaces=tuple(nics), balloon_period=period)


def guest_memory_stale(stats: Mapping[str, Any], read_at: float, period: int | None,
                       poll_interval: float) -> bool | None:
    """Whether the guest-reported memory figures in ``stats`` are too old to show.

    Args:
        stats: one guest's ``getAllDomainStats`` answer; reads ``balloon.last-update``
            (seconds since the epoch, host clock: when QEMU last received the guest's
            report).
        read_at: when ``stats`` were read, seconds since the epoch.
        period: the balloon statistics period in seconds (:attr:`DomainDevices.balloon_period`);
            0 or None when none is set or it is unknown.
        poll_interval: ``stats.poll_interval``, seconds.

    Returns:
        True when the last report is older than 3 periods (3 poll intervals where no
        period is set: the guest stopped reporting, e.g. ``virsh dommemstat --period 0``,
        a dead balloon driver, a paused guest); False when it is within; None when there is
        nothing to judge (no ``balloon.last-update``, or 0: the guest never reported).
    """
    last = stats.get("balloon.last-update")
    if not isinstance(last, (int, float)) or isinstance(last, bool) or last <= 0:
        return None
    window = 3 * period if period else 3 * poll_interval
    return read_at - last > window


def without_guest_memory(stats: Mapping[str, Any]) -> dict[str, Any]:
    """``stats`` without the guest-reported memory figures (:data:`GUEST_MEMORY_KEYS`)."""
    return {k: v for k, v in stats.items() if k not in GUEST_MEMORY_KEYS}


def net_names(stats: Mapping[str, Any]) -> frozenset[str]:
    """The ``net.<i>.name`` values of one guest's stats (host-side device names)."""
    n = stats.get("net.count")
    count = n if isinstance(n, int) else 0
    return frozenset(v for i in range(count) if isinstance(v := stats.get(f"net.{i}.name"), str))


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    devices: DomainDevices
    names: frozenset[str]     # net names of the stats the read was made for
    read_at: float            # wall time of the read
    known: frozenset[str]     # every name the XML gives a NIC (target, alias, MAC): matched at each poll


class DeviceCache:
    """Parsed live XML per guest UUID, refreshed on events and when the stats disagree.

    Loop thread only: :meth:`on_event` (pump subscriber), the connection listener
    methods, and the poller's :meth:`refresh` and :meth:`get`.

    Args:
        max_age: seconds after which an entry is read again anyway (a balloon period
            changed with ``virsh dommemstat --period`` sends no event).
        read: the blocking ``(conn, uuids) -> {uuid: DomainDevices | None}`` run on the
            stats lane (default :func:`read_devices`; injected in tests).
        monotonic, wall: clocks in seconds.
    """

    #: Guests whose XML one lane call reads.
    BATCH = 64

    def __init__(self, max_age: float = 600.0,
                 read: Callable[[Any, list[str]], dict[str, DomainDevices | None]] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.max_age = max_age
        self._read = read or read_devices
        self._monotonic = monotonic
        self._wall = wall
        self._entries: dict[str, _Entry] = {}
        self._dirty: set[str] = set()
        self.reads = 0

    # -- pump subscriber / connection listener ----------------------------------------
    def on_event(self, ev: Event) -> None:
        """Lifecycle (started, defined) and device added/removed events mark the
        guest for a new read; stopped, crashed or undefined guests are forgotten."""
        if ev.source != Source.DOMAIN or not ev.uuid:
            return
        if ev.kind == Kind.LIFECYCLE and ev.event in _FORGET_LIFECYCLE:
            self._entries.pop(ev.uuid, None)
            self._dirty.discard(ev.uuid)
        elif (ev.kind == Kind.LIFECYCLE and ev.event in _REREAD_LIFECYCLE) or ev.kind in _DEVICE_KINDS:
            self._dirty.add(ev.uuid)

    def connection_ready(self, conn: Any) -> None:
        """A new connection: guests may have restarted unseen; read everything again."""
        self._entries.clear()
        self._dirty.clear()

    def connection_lost(self) -> None:
        """Nothing to do: the entries are re-read after the next connect."""

    # -- poller -------------------------------------------------------------------------
    def get(self, uuid: str) -> DomainDevices | None:
        """The cached devices of ``uuid`` (None if never read)."""
        entry = self._entries.get(uuid)
        return entry.devices if entry is not None else None

    def wanted(self, rows: Iterable[tuple[str, Mapping[str, Any]]], now: float,
               poll_interval: float) -> list[str]:
        """UUIDs whose XML to read now, from this poll's ``(uuid, stats)`` rows.

        A guest with NICs in its stats or balloon figures is read when it has no entry,
        an event marked it, its entry is older than ``max_age``, its stats name a NIC
        the entry does not know (and did not name it when it was read: a NIC the XML
        does not list is not read again every poll), or its guest memory figures look
        stale by the cached period and the entry was read before they turned stale
        (one read per turn, to check the live period).
        """
        out = []
        for uuid, st in rows:
            names = net_names(st)
            if not names and "balloon.last-update" not in st:
                continue
            entry = self._entries.get(uuid)
            if entry is None or uuid in self._dirty or now - entry.read_at > self.max_age:
                out.append(uuid)
                continue
            if not names <= entry.known and names != entry.names:
                out.append(uuid)
                continue
            period = entry.devices.balloon_period
            if guest_memory_stale(st, now, period, poll_interval):
                last = st["balloon.last-update"]
                turned_stale = last + 3 * (period or poll_interval)
                if entry.read_at < turned_stale:
                    out.append(uuid)
        return out

    def store(self, uuid: str, devices: DomainDevices | None, names: frozenset[str], now: float) -> None:
        """Record a read made for stats naming ``names`` (``devices`` None: the guest is gone)."""
        self._dirty.discard(uuid)
        if devices is None:
            self._entries.pop(uuid, None)
            return
        known = frozenset(name for n in devices.interfaces for name in (n.target, n.alias, n.mac) if name)
        self._entries[uuid] = _Entry(devices, names, now, known)
        self.reads += 1

    async def refresh(self, rows: Sequence[tuple[str, str, Mapping[str, Any]]], end: float, lanes: LanePool,
                      poll_interval: float) -> None:
        """Read the live XML of the guests :meth:`wanted` names, on the stats lane, by ``end``
        (monotonic seconds); ``rows`` are this poll's ``(name, uuid, stats)``.

        Batches of :attr:`BATCH` guests, each with the rest of the poll's deadline, while
        that rest is more than twice what the last batch took: a first poll on a big host
        spreads its reads over several polls rather than let one outlive its deadline.
        A guest not read keeps its cached devices (or none). Never raises for libvirt."""
        wanted = self.wanted(((u, st) for _n, u, st in rows), self._wall(), poll_interval)
        if not wanted:
            return
        wanted_set = set(wanted)
        names = {u: net_names(st) for _n, u, st in rows if u in wanted_set}
        took = 0.0
        for i in range(0, len(wanted), self.BATCH):
            remaining = end - self._monotonic()
            if remaining < max(0.05, 2 * took):
                log.debug("device_reads_deferred", guests=len(wanted) - i)
                return
            batch = wanted[i:i + self.BATCH]
            t0 = self._monotonic()
            try:
                got = await lanes.run("stats", "XMLDesc", self._read, batch, timeout=remaining)
            except (CallTimeout, LaneUnavailable, libvirt.libvirtError) as err:
                log.warning("device_reads_failed", guests=len(batch), error=str(err).strip())
                return
            took = self._monotonic() - t0
            now = self._wall()
            for uuid, devices in got.items():
                self.store(uuid, devices, names.get(uuid, frozenset()), now)

    def retain(self, uuids: Iterable[str]) -> None:
        """Forget guests not in ``uuids`` (the guests of the latest poll)."""
        keep = set(uuids)
        for uuid in [u for u in self._entries if u not in keep]:
            del self._entries[uuid]
        self._dirty &= keep


def read_devices(conn: libvirt.virConnect, uuids: list[str]) -> dict[str, DomainDevices | None]:
    """Blocking (run on a lane): ``lookupByUUIDString`` + ``XMLDesc(0)`` of each guest.

    Returns parsed devices by UUID; None for a guest that is gone (``VIR_ERR_NO_DOMAIN``).
    A guest whose XML cannot be read for another reason is left out (read again next poll).
    """
    out: dict[str, DomainDevices | None] = {}
    for uuid in uuids:
        try:
            xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                out[uuid] = None
            continue
        try:
            out[uuid] = parse_devices(xml)
        except ET.ParseError:
            continue
    return out
