"""Per-domain fallback: statistics groups the bulk call does not return, read one guest at a time.

Some drivers answer ``getAllDomainStats`` with part of the groups asked for: libvirt's
test driver returns the ``state`` group only, whatever the flags. Most of them still
answer the classic per-domain calls, so for a group the bulk call never returned on
this connection the poller reads it per guest and translates the answers into the
bulk call's field names (``cpu.time``, ``balloon.current``, ``vcpu.0.time``,
``block.0.rd.bytes``, ``net.0.rx.bytes``...), so the metric mapping is the same.

==============  ====================================================================
group           calls (the bulk fields they give)
==============  ====================================================================
``cpu``         ``virDomainGetInfo`` (``cpu.time``), ``virDomainGetCPUStats`` total
                (``cpu.user``, ``cpu.system``)
``balloon``     ``virDomainGetInfo`` (``balloon.current``, ``balloon.maximum``),
                ``virDomainMemoryStats`` (``balloon.rss``, ``.unused``, ``.usable``...)
``vcpu``        ``virDomainGetInfo`` (``vcpu.current``), ``virDomainGetVcpusFlags``
                (``vcpu.maximum``), ``virDomainGetVcpus`` (``vcpu.N.state``, ``.time``)
``block``       ``virDomainGetXMLDesc`` (disks), ``virDomainBlockStats`` (``rd``/``wr``
                bytes and requests), ``virDomainGetBlockInfo`` (capacity, allocation,
                physical)
``interface``   ``virDomainGetXMLDesc`` (interfaces with a host-side ``target dev``),
                ``virDomainInterfaceStats`` (``net.N.rx.bytes``...)
==============  ====================================================================

Only what libvirt returns is kept: a call that fails leaves its fields out (no
sample, never a 0), as do values libvirt reports as unknown (-1). A guest that is not
running is not asked (the bulk call gives such guests no figures either).

Which path a group took is :func:`group_sources`: ``bulk`` once the bulk call has
returned any field of it on this connection, then never per domain again (a guest
that answers NOWAIT without some figures is busy, and a per-domain call would wait
for it); ``per_domain`` while it never has.

The reads run on the poller's lanes with the poll's deadline, one guest per call
(:class:`PerDomainReader`): a call that outlives it quarantines its lane like any
other, and that guest becomes a suspect.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import libvirt
import structlog

from .calls import CallTimeout, attempt as refusable
from .groups import GROUP_PREFIXES
from .lanes import LanePool, LaneUnavailable

log = structlog.get_logger("virtwatch.stats")

#: Bulk group -> prefix of its fields; the groups a per-domain read can stand in for.
FALLBACK_PREFIXES: Mapping[str, str] = {g: GROUP_PREFIXES[g] for g in ("cpu", "balloon", "vcpu", "block", "interface")}

#: ``virDomainMemoryStats`` keys and the bulk ``balloon.*`` field each one is
#: (``actual`` is ``balloon.current``, taken from ``virDomainGetInfo`` as the bulk call does).
MEMORY_STATS_FIELDS: Mapping[str, str] = {
    "swap_in": "balloon.swap_in",
    "swap_out": "balloon.swap_out",
    "major_fault": "balloon.major_fault",
    "minor_fault": "balloon.minor_fault",
    "unused": "balloon.unused",
    "available": "balloon.available",
    "usable": "balloon.usable",
    "rss": "balloon.rss",
    "last_update": "balloon.last-update",
    "disk_caches": "balloon.disk_caches",
    "hugetlb_pgalloc": "balloon.hugetlb_pgalloc",
    "hugetlb_pgfail": "balloon.hugetlb_pgfail",
}

BLOCK_STATS_FIELDS = ("rd.reqs", "rd.bytes", "wr.reqs", "wr.bytes", "errors")
"""``virDomainBlockStats`` tuple order, as bulk ``block.N.*`` suffixes."""

INTERFACE_STATS_FIELDS = ("rx.bytes", "rx.pkts", "rx.errs", "rx.drop", "tx.bytes", "tx.pkts", "tx.errs", "tx.drop")
"""``virDomainInterfaceStats`` tuple order, as bulk ``net.N.*`` suffixes."""

BLOCK_INFO_FIELDS = ("capacity", "allocation", "physical")
"""``virDomainGetBlockInfo`` list order, as bulk ``block.N.*`` suffixes."""


# -- pure pieces ------------------------------------------------------------------------

def groups_present(stats: Mapping[str, Any], groups: Iterable[str]) -> set[str]:
    """The fallback-capable ``groups`` of which ``stats`` (one bulk answer) has a field."""
    prefixes = {g: FALLBACK_PREFIXES[g] for g in groups if g in FALLBACK_PREFIXES}
    return {g for g, p in prefixes.items() if any(k.startswith(p) for k in stats)}


def missing_groups(requested: Sequence[str], seen: Iterable[str]) -> tuple[str, ...]:
    """The requested groups a per-domain read must stand in for: those it can, that
    the bulk call has not returned on this connection (in ``requested`` order)."""
    have = set(seen)
    return tuple(g for g in requested if g in FALLBACK_PREFIXES and g not in have)


def group_sources(requested: Sequence[str], seen: Iterable[str]) -> dict[str, str]:
    """Path of each requested group: ``bulk`` (returned by the bulk call on this
    connection, and ``state`` always), ``per_domain`` (read guest by guest) or
    ``none`` (not returned, and no per-domain call stands in for it: ``perf``...)."""
    have = set(seen)
    return {g: "bulk" if g == "state" or g in have else "per_domain" if g in FALLBACK_PREFIXES else "none"
            for g in requested}


@dataclasses.dataclass(frozen=True, slots=True)
class Disk:
    """A ``<disk>`` of the domain XML: its target (``vda``) and source (file, dev, dir,
    volume or network name; None for an empty drive)."""

    target: str
    source: str | None


def devices_from_xml(xml: str) -> tuple[list[Disk], list[str]]:
    """Disks (in XML order) and the host-side device names of the interfaces that have
    one (``<target dev=...>``), from a domain's XML."""
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        src = d.find("source")
        source = None
        if src is not None:
            source = next((src.get(a) for a in ("file", "dev", "dir", "volume", "name") if src.get(a)), None)
        disks.append(Disk(target=str(target.get("dev")), source=source))
    nics = [str(t.get("dev")) for t in root.findall("./devices/interface/target") if t.get("dev")]
    return disks, nics


@dataclasses.dataclass(frozen=True, slots=True)
class Readings:
    """What the per-domain calls returned for one guest (None: not asked, or refused).

    Attributes:
        info: ``virDomainGetInfo``: [state, maxMem KiB, memory KiB, nrVirtCpu, cpuTime ns].
        cpu_stats: ``virDomainGetCPUStats`` total: [{cpu_time, user_time, system_time}].
        vcpus: ``virDomainGetVcpus`` info list: (number, state, cpuTime ns, cpu) each.
        vcpu_max: ``virDomainGetVcpusFlags(LIVE|MAXIMUM)``.
        memory: ``virDomainMemoryStats`` (KiB, counts, seconds).
        disks: (disk, blockStats tuple or None, blockInfo list or None) each.
        nics: (device, interfaceStats tuple or None) each.
    """

    info: Sequence[int] | None = None
    cpu_stats: Sequence[Mapping[str, int]] | None = None
    vcpus: Sequence[Sequence[int]] | None = None
    vcpu_max: int | None = None
    memory: Mapping[str, int] | None = None
    disks: Sequence[tuple[Disk, Sequence[int] | None, Sequence[int] | None]] | None = None
    nics: Sequence[tuple[str, Sequence[int] | None]] | None = None


def _known(value: Any) -> bool:
    """libvirt reports a figure it does not have as -1."""
    return isinstance(value, int) and value >= 0


def translate(r: Readings, groups: Iterable[str]) -> dict[str, Any]:
    """Bulk-call fields (``getAllDomainStats`` names and units) of ``groups`` from ``r``."""
    want = set(groups)
    out: dict[str, Any] = {}
    if r.info is not None:
        _state, max_mem, mem, nr_vcpu, cpu_time = r.info[:5]
        if "cpu" in want:
            out["cpu.time"] = cpu_time
        if "balloon" in want:
            out["balloon.current"] = mem
            out["balloon.maximum"] = max_mem
        if "vcpu" in want:
            out["vcpu.current"] = nr_vcpu
    if "cpu" in want and r.cpu_stats:
        total = r.cpu_stats[0]
        out.update({field: total[key] for key, field in (("user_time", "cpu.user"), ("system_time", "cpu.system"))
                    if _known(total.get(key))})
    if "balloon" in want and r.memory:
        out.update({MEMORY_STATS_FIELDS[k]: v for k, v in r.memory.items() if k in MEMORY_STATS_FIELDS})
    if "vcpu" in want:
        if r.vcpu_max is not None:
            out["vcpu.maximum"] = r.vcpu_max
        for number, state, cpu_time, _cpu in r.vcpus or ():
            out[f"vcpu.{number}.state"] = state
            out[f"vcpu.{number}.time"] = cpu_time
    if "block" in want and r.disks is not None:
        out.update(_block_fields(r.disks))
    if "interface" in want and r.nics is not None:
        out["net.count"] = len(r.nics)
        for i, (dev, stats) in enumerate(r.nics):
            out[f"net.{i}.name"] = dev
            out.update(_numbered(f"net.{i}.", INTERFACE_STATS_FIELDS, stats))
    return out


def _numbered(prefix: str, names: Sequence[str], values: Sequence[int] | None) -> dict[str, int]:
    """``prefix + name`` for each known value of a stats tuple (shorter tuples give fewer)."""
    return {prefix + key: v for key, v in zip(names, values or (), strict=False) if _known(v)}


def _block_fields(disks: Sequence[tuple[Disk, Sequence[int] | None, Sequence[int] | None]]) -> dict[str, Any]:
    out: dict[str, Any] = {"block.count": len(disks)}
    for i, (disk, stats, info) in enumerate(disks):
        out[f"block.{i}.name"] = disk.target
        if disk.source is not None:
            out[f"block.{i}.path"] = disk.source
        out.update(_numbered(f"block.{i}.", BLOCK_STATS_FIELDS, stats))
        out.update(_numbered(f"block.{i}.", BLOCK_INFO_FIELDS, info))
    return out


# -- the blocking read (on a lane's thread) ---------------------------------------------

OnError = Callable[[str, libvirt.libvirtError], None]


def read_guest(conn: libvirt.virConnect, uuid: str, groups: tuple[str, ...], on_error: OnError) -> dict[str, Any]:
    """One running guest's ``groups`` by the classic calls, as bulk fields ({} when it
    is not running). Each refused call goes to ``on_error`` and leaves its fields out.
    Raises libvirtError ``VIR_ERR_NO_DOMAIN`` when the guest is gone. Blocking."""
    dom = conn.lookupByUUIDString(uuid)
    if not dom.isActive():
        return {}

    def attempt(call: str, fn: Callable[[], Any]) -> Any:
        return refusable(call, fn, on_error)

    want = set(groups)
    info = attempt("domainGetInfo", dom.info) if want & {"cpu", "balloon", "vcpu"} else None
    disks: list[Disk] = []
    nics: list[str] = []
    if want & {"block", "interface"}:
        xml = attempt("domainGetXMLDesc", lambda: dom.XMLDesc(0))
        if xml is not None:
            disks, nics = devices_from_xml(xml)
    vcpus = vcpu_max = None
    if "vcpu" in want:
        pinned = attempt("domainGetVcpus", dom.vcpus)  # (info per vCPU, CPU maps)
        vcpus = pinned[0] if pinned is not None else None
        vcpu_max = attempt("domainGetVcpusFlags",
                           lambda: dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_VCPU_MAXIMUM))
    block = None
    if "block" in want:  # an empty drive (no source) has no figures to ask for
        block = [(d, attempt("domainBlockStats", functools.partial(dom.blockStats, d.target)) if d.source else None,
                  attempt("domainGetBlockInfo", functools.partial(dom.blockInfo, d.target)) if d.source else None)
                 for d in disks]
    return translate(Readings(
        info=info,
        cpu_stats=attempt("domainGetCPUStats", lambda: dom.getCPUStats(True)) if "cpu" in want else None,
        vcpus=vcpus,
        vcpu_max=vcpu_max,
        memory=attempt("domainMemoryStats", dom.memoryStats) if "balloon" in want else None,
        disks=block,
        nics=[(n, attempt("domainInterfaceStats", functools.partial(dom.interfaceStats, n))) for n in nics]
        if "interface" in want else None,
    ), groups)


# -- on the lanes -------------------------------------------------------------------------

Row = tuple[str, str, dict[str, Any]]
"""(name, uuid, stats) as the poller's rows."""


@dataclasses.dataclass(frozen=True, slots=True)
class Filled:
    """The result of :meth:`PerDomainReader.fill`.

    Attributes:
        rows: the rows read (bulk fields plus the per-domain ones), the others left out.
        held: UUIDs not read this poll (no time or no lane left): stale, last figures kept.
        hung: UUID -> name of the guest whose read outlived the deadline (a suspect now).
    """

    rows: list[Row]
    held: frozenset[str] = frozenset()
    hung: Mapping[str, str] = dataclasses.field(default_factory=dict)


class PerDomainReader:
    """Tracks which groups the bulk call returns on this connection and reads the
    others guest by guest on a lane.

    Args:
        requested: ``stats.groups``.
        lanes: the poller's lane pool.
        read: blocking ``(conn, uuid, groups, on_error) -> fields`` (:func:`read_guest`).
        on_error: told of each refused per-domain call (on the lane's thread).
        monotonic: clock in seconds (the poll's deadline is on it).
    """

    def __init__(self, requested: tuple[str, ...], lanes: LanePool,
                 read: Callable[[Any, str, tuple[str, ...], OnError], dict[str, Any]], on_error: OnError,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.requested = requested
        self._lanes = lanes
        self._read = read
        self._on_error = on_error
        self._monotonic = monotonic
        self._seen: set[str] = set()

    def reset(self) -> None:
        """A new connection (maybe another libvirt): learn the bulk call's groups again."""
        self._seen.clear()

    def observe(self, rows: Iterable[Row]) -> None:
        """Note the groups a bulk answer has (once every group was seen on this connection,
        nothing is left to look for: a scan of every key of every guest saved per poll)."""
        wanted = [g for g in self.requested if g in FALLBACK_PREFIXES and g not in self._seen]
        for _n, _u, st in rows:
            if not wanted:
                return
            found = groups_present(st, wanted)
            self._seen |= found
            wanted = [g for g in wanted if g not in found]

    @property
    def missing(self) -> tuple[str, ...]:
        """Groups read per domain now."""
        return missing_groups(self.requested, self._seen)

    def sources(self) -> dict[str, str]:
        """Each requested group's path now (:func:`group_sources`)."""
        return group_sources(self.requested, self._seen)

    async def fill(self, role: str, rows: list[Row], end: float, only: Collection[str] | None = None) -> Filled:
        """Add the missing groups (those in ``only``, when given: the groups due this poll)
        to each row, one guest per call on ``role``'s lane, by ``end`` (monotonic). Stops at
        the first call that outlives it (that guest is ``hung``, its lane quarantined) or
        that no lane can take; the guests not read by then are ``held``. A guest gone
        meanwhile keeps its bulk row."""
        groups = self.missing if only is None else tuple(g for g in self.missing if g in only)
        if not groups:
            return Filled(rows)
        out: list[Row] = []
        for i, (name, uuid, st) in enumerate(rows):
            rest = frozenset(u for _n, u, _s in rows[i:])
            remaining = end - self._monotonic()
            if remaining <= 0:
                return Filled(out, rest)
            try:
                extra = await self._lanes.run(role, "perDomainStats", self._read, uuid, groups, self._on_error,
                                              timeout=remaining)
            except CallTimeout:
                log.warning("per_domain_stats_timeout", guest=name, timeout_seconds=round(remaining, 3))
                return Filled(out, rest, {uuid: name})
            except LaneUnavailable as err:
                log.debug("per_domain_stats_no_lane", reason=err.reason)
                return Filled(out, rest)
            except libvirt.libvirtError as err:
                log.debug("per_domain_stats_failed", guest=name, error=str(err).strip())
                extra = {}
            out.append((name, uuid, {**st, **extra}))
        return Filled(out)
