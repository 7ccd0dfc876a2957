"""The statistics poller: bulk guest stats and host figures on a fixed schedule.

Every ``poll_interval`` one ``getAllDomainStats(groups, NOWAIT)`` fetches
every guest's statistics in a single RPC (design doc §3). Polls never
overlap: the schedule is drift-free (deadline *k* is ``start + k *
interval``), a poll still running at its successor's deadline makes that
tick a counted skip.

Degraded mode: when the bulk call misses its deadline, every known guest is
probed alone (``domainListGetStats([dom])``, one call in flight per guest);
those that do not answer in time are marked stale, and later polls ask only
the responsive guests in one ``domainListGetStats`` call while stale guests
are re-probed one by one until they answer.

The result of each poll is an immutable :class:`Snapshot`; the metrics
collector renders from the latest one and never calls libvirt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable, Mapping, Protocol

import libvirt
import structlog

from ..config import StatsSettings
from ..metrics.instruments import Instruments
from .calls import CallTimeout, Calls, error_code_name

log = structlog.get_logger("virtwatch.stats")

GROUP_FLAGS: Mapping[str, str] = {
    "state": "VIR_DOMAIN_STATS_STATE",
    "cpu": "VIR_DOMAIN_STATS_CPU_TOTAL",
    "balloon": "VIR_DOMAIN_STATS_BALLOON",
    "vcpu": "VIR_DOMAIN_STATS_VCPU",
    "interface": "VIR_DOMAIN_STATS_INTERFACE",
    "block": "VIR_DOMAIN_STATS_BLOCK",
    "perf": "VIR_DOMAIN_STATS_PERF",
    "iothread": "VIR_DOMAIN_STATS_IOTHREAD",
    "memory": "VIR_DOMAIN_STATS_MEMORY",
    "dirtyrate": "VIR_DOMAIN_STATS_DIRTYRATE",
    "vm": "VIR_DOMAIN_STATS_VM",
}


def stats_flags(groups: tuple[str, ...]) -> int:
    """OR of the ``VIR_DOMAIN_STATS_*`` flags for ``groups`` this libvirt knows."""
    flags = 0
    for g in groups:
        flags |= getattr(libvirt, GROUP_FLAGS[g], 0)
    return flags


@dataclasses.dataclass(frozen=True, slots=True)
class DomainStats:
    """One guest's statistics from one poll.

    Attributes:
        name, uuid: identity.
        stats: the typed-parameter dict exactly as ``getAllDomainStats``
            returned it (ns for cpu/vcpu/block times, KiB for balloon sizes).
        stale: True if the guest did not answer in time this poll; ``stats``
            then holds the last answer it gave (possibly empty).
        collected_at: wall time (s) ``stats`` was read.
    """

    name: str
    uuid: str
    stats: Mapping[str, Any]
    stale: bool
    collected_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PoolInfo:
    """A storage pool from ``virStoragePoolGetInfo`` (never refreshed by us).

    ``state`` is virStoragePoolState (2 running); sizes are bytes.
    """

    name: str
    uuid: str
    state: int
    capacity: int
    allocation: int
    available: int
    active: bool


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A virtual network: ``listAllNetworks`` with the ACTIVE/INACTIVE filter."""

    name: str
    uuid: str
    active: bool


@dataclasses.dataclass(frozen=True, slots=True)
class HostStats:
    """Host figures from one poll; a field libvirt refused is None.

    Attributes:
        node_info: ``virNodeGetInfo`` list [model, memory MiB, cpus, MHz,
            nodes, sockets, cores, threads].
        memory: ``virNodeGetMemoryStats(ALL_CELLS)`` in KiB (total, free, buffers, cached).
        cpu: ``virNodeGetCPUStats(ALL_CPUS)`` in ns (kernel, user, idle, iowait).
        pools, networks: inventory.
    """

    node_info: tuple[Any, ...] | None
    memory: Mapping[str, int] | None
    cpu: Mapping[str, int] | None
    pools: tuple[PoolInfo, ...]
    networks: tuple[NetworkInfo, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The result of one poll: every guest's stats plus host figures.

    ``seq`` increases with every poll; ``domains`` is keyed by UUID.
    """

    seq: int
    time: float
    duration: float
    domains: Mapping[str, DomainStats]
    host: HostStats | None


class StatsSource(Protocol):
    """Where the poller reads from (libvirt in the daemon; injectable in tests).

    Every method blocks and is run in a worker thread by the poller.
    """

    def all_domains(self, conn: Any, flags: int) -> list[tuple[Any, dict[str, Any]]]:
        """``getAllDomainStats(flags, NOWAIT)`` → [(virDomain, stats)]."""

    def some_domains(self, conn: Any, doms: list[Any], flags: int) -> list[tuple[Any, dict[str, Any]]]:
        """``domainListGetStats(doms, flags, NOWAIT)`` → [(virDomain, stats)]."""

    def host(self, conn: Any, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
        """Host figures; each refused call is reported to ``on_error`` and left None/empty."""

    def list_domains(self, conn: Any) -> list[Any]:
        """``listAllDomains()`` → every virDomain (no guest job involved)."""


class LibvirtStatsSource:
    """:class:`StatsSource` over a real ``virConnect``."""

    def all_domains(self, conn: libvirt.virConnect, flags: int) -> list[tuple[Any, dict[str, Any]]]:
        """One ``getAllDomainStats`` RPC for every guest, active or not."""
        return conn.getAllDomainStats(flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)

    def some_domains(self, conn: libvirt.virConnect, doms: list[Any], flags: int) -> list[tuple[Any, dict[str, Any]]]:
        """One ``domainListGetStats`` RPC for ``doms``."""
        return conn.domainListGetStats(doms, flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)

    def list_domains(self, conn: libvirt.virConnect) -> list[Any]:
        """One ``listAllDomains`` RPC."""
        return conn.listAllDomains()

    def host(self, conn: libvirt.virConnect, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
        """Node info, memory and CPU stats, pools and networks (never refreshes a pool)."""

        def attempt(call: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except libvirt.libvirtError as err:
                on_error(call, err)
                return None

        node_info = attempt("getInfo", conn.getInfo)
        memory = attempt("getMemoryStats", lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS))
        cpu = attempt("getCPUStats", lambda: conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS))
        pools = []
        for pool in attempt("listAllStoragePools", conn.listAllStoragePools) or []:
            info = attempt("storagePoolGetInfo", pool.info)
            if info is None:
                continue
            state, capacity, allocation, available = info
            pools.append(PoolInfo(name=pool.name(), uuid=pool.UUIDString(), state=state, capacity=capacity,
                                  allocation=allocation, available=available,
                                  active=state == libvirt.VIR_STORAGE_POOL_RUNNING))
        networks = []
        for flag, active in ((libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE, True),
                             (libvirt.VIR_CONNECT_LIST_NETWORKS_INACTIVE, False)):
            for net in attempt("listAllNetworks", lambda f=flag: conn.listAllNetworks(f)) or []:
                networks.append(NetworkInfo(name=net.name(), uuid=net.UUIDString(), active=active))
        return HostStats(node_info=tuple(node_info) if node_info else None, memory=memory, cpu=cpu,
                         pools=tuple(sorted(pools, key=lambda p: p.name)),
                         networks=tuple(sorted(networks, key=lambda n: n.name)))


class ConnectionPort(Protocol):
    """What the poller needs from the connection manager."""

    @property
    def conn(self) -> Any:
        """The ready connection or None."""

    ready: asyncio.Event


class StatsPoller:
    """Polls on a drift-free schedule and publishes :class:`Snapshot` objects.

    Args:
        settings: the ``[stats]`` section.
        connection: gives the current connection (None while down).
        calls: bounded executor; each poll uses one call slot at a time.
        instruments: poll duration, skips, errors, last success.
        source: the stats source (default: libvirt).
        monotonic, wall: clocks in seconds (injected for tests).
        on_snapshot: called with each new snapshot (on the loop).
    """

    def __init__(self, settings: StatsSettings, connection: ConnectionPort, calls: Calls, instruments: Instruments,
                 source: StatsSource | None = None, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 on_snapshot: Callable[[Snapshot], None] | None = None) -> None:
        self.settings = settings
        self._connection = connection
        self._calls = calls
        self._instruments = instruments
        self._source = source or LibvirtStatsSource()
        self._monotonic = monotonic
        self._wall = wall
        self._on_snapshot = on_snapshot
        self._flags = stats_flags(settings.groups)
        self._seq = 0
        self._domains: dict[str, Any] = {}           # uuid -> virDomain (current connection only)
        self._stale: set[str] = set()
        self._probes: dict[str, asyncio.Future[Any]] = {}
        self._last: dict[str, DomainStats] = {}
        self.latest: Snapshot | None = None
        self._running = False

    # -- connection listener --------------------------------------------------
    def connection_ready(self, conn: Any) -> None:
        """New connection: forget objects of the previous one."""
        self._reset()

    def connection_lost(self) -> None:
        """Drop every virDomain object (teardown order, design doc §3a)."""
        self._reset()

    def _reset(self) -> None:
        self._domains.clear()
        self._stale.clear()
        self._probes.clear()

    @property
    def stale(self) -> frozenset[str]:
        """UUIDs of guests currently marked stale."""
        return frozenset(self._stale)

    # -- schedule -----------------------------------------------------------
    async def run(self) -> None:
        """Poll every ``poll_interval`` seconds until cancelled."""
        interval = self.settings.poll_interval
        next_due = self._monotonic()
        while True:
            now = self._monotonic()
            if now < next_due:
                await asyncio.sleep(next_due - now)
            if self._connection.conn is None:
                await self._connection.ready.wait()
                next_due = self._monotonic()
                continue
            try:
                await self.poll_once()
            except Exception:  # a bug must cost one poll, not every poll after it
                self._instruments.poll_errors.inc()
                log.exception("poll_crashed")
            next_due += interval
            missed = 0
            now = self._monotonic()
            while next_due <= now:
                next_due += interval
                missed += 1
            if missed:
                self._instruments.polls_skipped.inc(missed)
                log.warning("poll_overran", skipped=missed, interval_seconds=interval)

    async def poll_once(self) -> Snapshot | None:
        """Run one poll now; returns the new snapshot, or None if it failed.

        Never raises for libvirt failures (they are counted and logged).
        """
        conn = self._connection.conn
        if conn is None:
            return None
        if self._running:
            self._instruments.polls_skipped.inc()
            return None
        self._running = True
        started = self._monotonic()
        try:
            return await self._poll(conn, started)
        finally:
            self._running = False

    async def _poll(self, conn: Any, started: float) -> Snapshot | None:
        timeout = self.settings.effective_poll_timeout
        fresh: dict[str, DomainStats] = {}
        ok = True
        try:
            if self._stale:
                responsive = [d for u, d in self._domains.items() if u not in self._stale]
                results = await self._calls.run("domainListGetStats", self._source.some_domains, conn, responsive,
                                                self._flags, timeout=timeout) if responsive else []
            else:
                results = await self._calls.run("getAllDomainStats", self._source.all_domains, conn, self._flags,
                                                timeout=timeout)
            if self._connection.conn is not conn:
                return None  # the connection changed under us: these objects belong to the old one
            now = self._wall()
            if not self._stale:
                self._domains.clear()
            for dom, st in results:
                uuid = dom.UUIDString()
                self._domains[uuid] = dom
                fresh[uuid] = DomainStats(name=dom.name(), uuid=uuid, stats=st, stale=False, collected_at=now)
        except CallTimeout:
            ok = False
            self._instruments.poll_errors.inc()
            log.warning("poll_timeout", timeout_seconds=timeout, guests=len(self._domains))
            if not self._domains:  # never polled successfully: learn the guests without stats
                try:
                    for dom in await self._calls.run("listAllDomains", self._source.list_domains, conn,
                                                     timeout=timeout):
                        self._domains[dom.UUIDString()] = dom
                except (CallTimeout, libvirt.libvirtError) as err:
                    log.warning("poll_list_failed", error=str(err).strip())
            fresh = await self._probe_each(conn, list(self._domains))
        except libvirt.libvirtError as err:
            self._instruments.poll_errors.inc()
            log.warning("poll_failed", error=str(err).strip(), code=error_code_name(err))
            return None
        if self._stale:
            fresh.update(await self._probe_each(conn, [u for u in self._stale if u not in fresh]))
        if self._connection.conn is not conn:
            self._reset()
            return None
        host = None
        if self.settings.host:
            try:
                host = await self._calls.run("hostStats", self._source.host, conn, self._host_error, timeout=timeout)
            except (CallTimeout, libvirt.libvirtError) as err:
                # each host call catches its own errors, so a libvirtError here is the whole call
                # refused: the connection was retired (lost) while this call waited for its thread
                ok = False
                self._instruments.poll_errors.inc()
                log.warning("host_stats_failed", error=str(err).strip(),
                            code="timeout" if isinstance(err, CallTimeout) else error_code_name(err))
        domains = dict(fresh)
        self._last = domains  # stale entries already carry their last answer
        duration = self._monotonic() - started
        self._seq += 1
        snap = Snapshot(seq=self._seq, time=self._wall(), duration=duration, domains=domains, host=host)
        self.latest = snap
        self._instruments.poll_duration.observe(duration)
        if ok:
            self._instruments.last_poll_success.set(snap.time)
        if self._on_snapshot is not None:
            self._on_snapshot(snap)
        log.debug("poll_done", guests=len(domains), stale=len(self._stale), duration_seconds=round(duration, 4))
        return snap

    async def _probe_each(self, conn: Any, uuids: list[str]) -> dict[str, DomainStats]:
        """Probe guests one by one (one call in flight per guest); the ones
        that miss the deadline are marked stale and keep their last stats."""
        timeout = self.settings.effective_poll_timeout
        loop = asyncio.get_running_loop()
        for uuid in uuids:
            dom = self._domains.get(uuid)
            if dom is None or (uuid in self._probes and not self._probes[uuid].done()):
                continue
            self._probes[uuid] = loop.create_task(
                self._calls.run("domainListGetStats", self._source.some_domains, conn, [dom], self._flags,
                                timeout=3600))
        pending = {u: f for u, f in self._probes.items() if u in uuids}
        if pending:
            await asyncio.wait(pending.values(), timeout=timeout)
        out: dict[str, DomainStats] = {}
        now = self._wall()
        for uuid in uuids:
            fut = self._probes.get(uuid)
            dom = self._domains.get(uuid)
            if fut is not None and fut.done():
                self._probes.pop(uuid, None)
                err = fut.exception()
                if err is None:
                    for d, st in fut.result():
                        out[uuid] = DomainStats(name=d.name(), uuid=uuid, stats=st, stale=False, collected_at=now)
                    self._stale.discard(uuid)
                    continue
                if isinstance(err, libvirt.libvirtError) and err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self._domains.pop(uuid, None)
                    self._stale.discard(uuid)
                    continue
            if dom is None:
                continue
            self._stale.add(uuid)
            last = self._last.get(uuid)
            out[uuid] = DomainStats(name=dom.name(), uuid=uuid, stats=last.stats if last else {}, stale=True,
                                    collected_at=last.collected_at if last else now)
        stale_names = sorted(d.name for d in out.values() if d.stale)
        if stale_names:
            log.warning("guests_stale", guests=stale_names)
        return out

    def _host_error(self, call: str, err: libvirt.libvirtError) -> None:
        code = error_code_name(err)
        if code != "VIR_ERR_NO_SUPPORT":
            self._instruments.api_errors.labels(call=call, code=code).inc()
