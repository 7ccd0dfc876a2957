"""Where the statistics poller reads from: the :class:`StatsSource` port and its libvirt
implementation, :class:`LibvirtStatsSource`. Every method blocks and runs on a lane's
thread (:mod:`~virtwatch.virt.lanes`); rows carry names and UUIDs, never virDomain objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import libvirt

from .host import HostStats, read_host
from .perdomain import OnError, read_guest


@dataclasses.dataclass(frozen=True, slots=True)
class ControlState:
    """``virDomainGetControlInfo`` of one running guest (answered without QEMU).

    ``state`` is virDomainControlState (0 ok, 1 job, 2 occupied, 3 error);
    ``state_ms`` how long the monitor has been in it, in milliseconds.
    """

    name: str
    uuid: str
    state: int
    state_ms: int


def stuck_guests(states: Mapping[str, ControlState], min_ms: float) -> set[str]:
    """UUIDs whose monitor looks stuck: occupied by one command for at least
    ``min_ms`` milliseconds, or in error (libvirt's "stuck in a job" case)."""
    return {u for u, s in states.items()
            if (s.state == libvirt.VIR_DOMAIN_CONTROL_OCCUPIED and s.state_ms >= min_ms)
            or s.state == libvirt.VIR_DOMAIN_CONTROL_ERROR}


DomainRow = tuple[str, str, dict[str, Any]]
"""One guest's answer: (name, uuid, typed-parameter stats dict)."""


class StatsSource(Protocol):
    """Where the poller reads from (libvirt in the daemon; injectable in tests).

    Every method blocks, takes the lane's connection first, and is run on a
    lane's thread by the poller. Rows carry names and UUIDs, never virDomain
    objects: those belong to the lane's connection and stay on its thread.
    """

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list[DomainRow]:
        """Every guest's stats except the UUIDs in ``exclude`` (NOWAIT)."""

    def control(self, conn: Any, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        """Control state of every running guest (or of ``uuids``), by UUID."""

    def probe(self, conn: Any, uuid: str, flags: int) -> DomainRow | None:
        """One guest's stats, or None when its monitor is still occupied (not asked).
        Raises libvirtError ``VIR_ERR_NO_DOMAIN`` when it is gone."""

    def host(self, conn: Any, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
        """Host figures; each refused call is reported to ``on_error`` and left None/empty."""

    def per_domain(self, conn: Any, uuid: str, groups: tuple[str, ...], on_error: OnError) -> dict[str, Any]:
        """One guest's ``groups`` by the classic per-domain calls, as bulk fields
        (:func:`~virtwatch.virt.perdomain.read_guest`)."""

    def job(self, conn: Any, uuid: str) -> tuple[bool, dict[str, Any] | None]:
        """(active, ``jobStats()`` or None when inactive) of one guest. Raises libvirtError
        ``VIR_ERR_NO_DOMAIN`` when it is gone."""


def _rows(results: list[tuple[Any, dict[str, Any]]]) -> list[DomainRow]:
    return [(dom.name(), dom.UUIDString(), st) for dom, st in results]


class LibvirtStatsSource:
    """:class:`StatsSource` over a real ``virConnect``."""

    NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT

    def bulk(self, conn: libvirt.virConnect, exclude: frozenset[str], flags: int) -> list[DomainRow]:
        """One ``getAllDomainStats`` RPC for every guest, active or not; with
        ``exclude``, ``listAllDomains`` plus one ``domainListGetStats`` for the rest."""
        if not exclude:
            return _rows(conn.getAllDomainStats(flags, self.NOWAIT))
        doms = [d for d in conn.listAllDomains() if d.UUIDString() not in exclude]
        return _rows(conn.domainListGetStats(doms, flags, self.NOWAIT)) if doms else []

    def control(self, conn: libvirt.virConnect, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        """``controlInfo()`` (no QEMU involved) of every running guest (``listAllDomains(ACTIVE)``)
        or of ``uuids`` (``lookupByUUIDString``; gone or stopped ones are left out)."""
        out = {}
        if uuids is None:
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        else:
            doms = []
            for uuid in sorted(uuids):
                try:
                    doms.append(conn.lookupByUUIDString(uuid))
                except libvirt.libvirtError:
                    continue
        for dom in doms:
            try:
                state, _details, ms = dom.controlInfo()
            except libvirt.libvirtError:
                continue  # stopped or vanished meanwhile
            uuid = dom.UUIDString()
            out[uuid] = ControlState(name=dom.name(), uuid=uuid, state=state, state_ms=ms)
        return out

    def probe(self, conn: libvirt.virConnect, uuid: str, flags: int) -> DomainRow | None:
        """``lookupByUUIDString``, ``controlInfo`` and, when the monitor is free,
        ``domainListGetStats([dom])``."""
        dom = conn.lookupByUUIDString(uuid)
        try:
            state = dom.controlInfo()[0]
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise
            state = libvirt.VIR_DOMAIN_CONTROL_OK  # not running: nothing can be stuck
        if state in (libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, libvirt.VIR_DOMAIN_CONTROL_ERROR):
            return None
        rows = _rows(conn.domainListGetStats([dom], flags, self.NOWAIT))
        return rows[0] if rows else None

    def per_domain(self, conn: libvirt.virConnect, uuid: str, groups: tuple[str, ...],
                   on_error: OnError) -> dict[str, Any]:
        """:func:`~virtwatch.virt.perdomain.read_guest`."""
        return read_guest(conn, uuid, groups, on_error)

    def job(self, conn: libvirt.virConnect, uuid: str) -> tuple[bool, dict[str, Any] | None]:
        """``isActive()`` and, when active, ``jobStats()`` (a query job: it runs beside a migration)."""
        dom = conn.lookupByUUIDString(uuid)
        active = bool(dom.isActive())
        return active, dom.jobStats() if active else None

    def host(self, conn: libvirt.virConnect, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
        """Node info, memory and CPU stats, pools and networks (never refreshes a pool)."""
        return read_host(conn, on_error)
