"""The statistics poller: bulk guest stats and host figures on a fixed schedule.

Every ``poll_interval`` one ``getAllDomainStats(groups, NOWAIT)`` fetches
every guest's statistics in a single RPC (design doc §3). Polls never
overlap: the schedule is drift-free (deadline *k* is ``start + k *
interval``), a poll still running at its successor's deadline makes that
tick a counted skip.

Every call runs on a *lane* (:mod:`~virtwatch.virt.lanes`): one connection
with one thread, so a call stuck on a hung QEMU holds only its own lane. The
bulk call runs on the ``stats`` lane, host figures on the ``host`` lane, in
parallel, each with the poll's deadline.

Stuck guests: a call that meets a hung QEMU blocks until QEMU answers (NOWAIT
only helps the calls after it). When the bulk call misses its deadline, its
lane is quarantined, and on a fresh lane ``virDomainGetControlInfo`` (which
never waits for QEMU) names the guests whose monitor has been occupied for
most of that deadline: those become *suspects*, and the bulk call is asked
again without them within the same poll. Later polls ask only the responsive
guests (``domainListGetStats`` with the explicit list, NOWAIT). Suspects are
probed one by one on the ``probe`` lane (control state first, statistics only
when the monitor is free), so one that wakes up rejoins at once; until then it
is exported stale with its last figures and their age.

The result of each poll is an immutable :class:`Snapshot`; the metrics
collector renders from the latest one and never calls libvirt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import libvirt
import structlog

from ..config import StatsSettings
from ..infra.timing import DriftFreeSchedule
from .calls import CallTimeout, error_code_name
from .devices import DeviceCache, DomainDevices, guest_memory_stale, without_guest_memory
from .groups import carried_fields, due_groups, group_counts, has_figures, polls_per_read, stats_flags
from .host import (
    HostStats,
    NetworkInfo as NetworkInfo,  # re-exported: the inventory and the metrics read them here
    PoolInfo as PoolInfo,
)
from .lanes import LanePool, LaneUnavailable
from .migration import MigrationTracker
from .perdomain import PerDomainReader
from .ports import VirtInstruments
from .source import (
    ControlState as ControlState,  # re-exported: tests and the lanes read them here
    DomainRow,
    LibvirtStatsSource as LibvirtStatsSource,
    StatsSource,
    stuck_guests as stuck_guests,
)

log = structlog.get_logger("virtwatch.stats")

@dataclasses.dataclass(frozen=True, slots=True)
class DomainStats:
    """One guest's statistics from one poll.

    Attributes:
        name, uuid: identity.
        stats: the typed-parameter dict as ``getAllDomainStats`` returned it
            (ns for cpu/vcpu/block times, KiB for balloon sizes), without the
            guest-reported memory figures when ``memory_stale`` is True.
        stale: True if the guest did not answer in time this poll; ``stats``
            then holds the last answer it gave (possibly empty).
        collected_at: wall time (s) ``stats`` was read.
        devices: NICs and balloon period from the live domain XML
            (:mod:`~virtwatch.virt.devices`), None when not read (yet).
        memory_stale: :func:`~virtwatch.virt.devices.guest_memory_stale` at
            ``collected_at``: True when the guest's last balloon report is older
            than 3 periods (its figures were dropped), None when there is none or
            ``devices`` is None (the period is unknown: not judged).
    """

    name: str
    uuid: str
    stats: Mapping[str, Any]
    stale: bool
    collected_at: float
    devices: DomainDevices | None = None
    memory_stale: bool | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The result of one poll: every guest's stats plus host figures.

    ``seq`` increases with every poll; ``domains`` is keyed by UUID; ``sources``
    maps each requested group to its path (``bulk``, ``per_domain`` or ``none``,
    :func:`~virtwatch.virt.perdomain.group_sources`).
    """

    seq: int
    time: float
    duration: float
    domains: Mapping[str, DomainStats]
    host: HostStats | None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


class ConnectionPort(Protocol):
    """What the poller needs from the connection manager: whether it is ready."""

    @property
    def conn(self) -> Any:
        """The ready connection or None."""

    ready: asyncio.Event


class StatsPoller:
    """Polls on a drift-free schedule and publishes :class:`Snapshot` objects.

    Args:
        settings: the ``[stats]`` section.
        connection: tells whether libvirt is connected (polls wait while not).
        lanes: the lane pool every call runs on (roles ``stats``, ``host``, ``probe``).
        instruments: poll duration, skips, errors, last success.
        source: the stats source (default: libvirt).
        monotonic, wall: clocks in seconds (injected for tests).
        on_snapshot: called with each new snapshot (on the loop).
        kept: the previous poller's :attr:`latest` at a reload: served (and kept for guests
            that are stuck at the first poll) until the next poll replaces it.
        devices: the per-guest XML cache; it reads what it lacks on the stats lane
            after the bulk call (:meth:`DeviceCache.refresh`); None: never read.
        migrations: guests migrating out get a ``jobStats`` read on the stats lane after the
            bulk call, reported to it (progress, and the end of a migration that failed).
    """

    def __init__(self, settings: StatsSettings, connection: ConnectionPort, lanes: LanePool,
                 instruments: VirtInstruments, source: StatsSource | None = None,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 on_snapshot: Callable[[Snapshot], None] | None = None, kept: Snapshot | None = None,
                 devices: DeviceCache | None = None, migrations: MigrationTracker | None = None) -> None:
        self.settings = settings
        self._connection = connection
        self._lanes = lanes
        self._instruments = instruments
        self._source = source or LibvirtStatsSource()
        self._monotonic = monotonic
        self._wall = wall
        self._on_snapshot = on_snapshot
        self._devices = devices
        self._migrations = migrations
        self._flags = stats_flags(settings.groups)
        # groups read less often than every poll (stats.group_intervals), counted in polls
        # since the connection came up: the first poll on a connection reads everything
        self._every = polls_per_read(settings.effective_group_intervals, settings.poll_interval)
        self._index = 0
        self._host_retry = False
        self._read_all = False  # a guest started: read every group at the next poll
        self._seq = kept.seq if kept else 0
        self._suspects: dict[str, str] = {}          # uuid -> name of guests not asked in bulk
        self._last: dict[str, DomainStats] = dict(kept.domains) if kept else {}
        self._fields: dict[str, dict[str, int]] = {}  # uuid -> fields per group, free-monitor answers
        self._host: HostStats | None = kept.host if kept else None
        # groups the bulk call lacks on this connection, read guest by guest (issue 14)
        self._per_domain = PerDomainReader(settings.groups, lanes, self._source.per_domain, self._per_domain_error,
                                           monotonic)
        self.latest: Snapshot | None = kept
        self._running = False

    # -- connection listener --------------------------------------------------
    def connection_ready(self, conn: Any) -> None:
        """New connection: stuck calls of the old one are gone with it; which groups
        the bulk call returns is learnt again (it may be another libvirt)."""
        self._suspects.clear()
        self._per_domain.reset()
        self._index = 0

    def connection_lost(self) -> None:
        """libvirt is gone: no guest is suspect any more (nothing to probe)."""
        self._suspects.clear()

    @property
    def stale(self) -> frozenset[str]:
        """UUIDs of guests currently suspect (left out of the bulk call)."""
        return frozenset(self._suspects)

    # -- schedule -----------------------------------------------------------
    async def run(self) -> None:
        """Poll every ``poll_interval`` seconds until cancelled."""
        interval = self.settings.poll_interval
        schedule = DriftFreeSchedule(interval, self._monotonic())
        while True:
            now = self._monotonic()
            if now < schedule.due:
                await asyncio.sleep(schedule.due - now)
            if self._connection.conn is None:
                await self._connection.ready.wait()
                schedule.restart(self._monotonic())
                continue
            try:
                await self.poll_once()
            except Exception:  # a bug must cost one poll, not every poll after it
                self._instruments.poll_errors.inc()
                log.exception("poll_crashed")
            missed = schedule.advance(self._monotonic())
            if missed:
                self._instruments.polls_skipped.inc(missed)
                log.warning("poll_overran", skipped=missed, interval_seconds=interval)

    async def poll_once(self) -> Snapshot | None:
        """Run one poll now; returns the new snapshot (None if one is running).

        Never raises for libvirt failures (they are counted and logged).
        """
        if self._running:
            self._instruments.polls_skipped.inc()
            return None
        self._running = True
        try:
            return await self._poll(self._monotonic())
        finally:
            self._running = False

    async def _poll(self, started: float) -> Snapshot:
        end = started + self.settings.effective_poll_timeout
        probe_now = dict(self._suspects)
        due, read, carried = self._plan()
        async with asyncio.TaskGroup() as tg:
            # host figures when due, and again at the next poll after a failed read
            host_due = self.settings.host and ("host" in due or self._host_retry)
            host_task = tg.create_task(self._host_figures(end)) if host_due else None
            probe_task = tg.create_task(self._probe(probe_now, end)) if probe_now else None
            rows, counts = await self._bulk(end, stats_flags(read))
            held: frozenset[str] = frozenset()
            if rows:
                self._per_domain.observe(rows)
                rows, held = await self._drop_thin(rows, counts, end, read)
                filled = await self._per_domain.fill("stats", rows, end, only=due)
                rows, held = filled.rows, held | filled.held
                self._add_suspects(filled.hung, filled.hung, "per-domain statistics call outlived the poll deadline")
                if self._devices is not None:
                    await self._devices.refresh(rows, end, self._lanes, self.settings.poll_interval)
            if self._migrations is not None:
                await self._read_jobs(end)
        host_ok = host_task.result() if host_task is not None else True
        self._host_retry = not host_ok
        probed, gone = probe_task.result() if probe_task is not None else ({}, set())
        now = self._wall()
        domains = self._answers(rows or [], now, carried)
        for uuid, (name, st) in probed.items():
            self._suspects.pop(uuid, None)  # answered: back in the bulk call from the next poll
            domains[uuid] = self._fresh(name, uuid, st, now)
        for uuid in gone:
            self._suspects.pop(uuid, None)
        if not self._suspects:
            self._lanes.release("probe")  # back to the normal lane count
        # Not answered this poll: suspects, guests held by another call, and every known
        # guest when the bulk call failed.
        left = dict(self._suspects)
        left.update({u: self._last[u].name for u in held if u in self._last})
        if rows is None:
            left.update({u: d.name for u, d in self._last.items() if u not in gone})
        for uuid, name in left.items():
            if uuid in domains:
                continue
            last = self._last.get(uuid)
            domains[uuid] = (dataclasses.replace(last, name=name, stale=True) if last is not None else
                             DomainStats(name=name, uuid=uuid, stats={}, stale=True, collected_at=now))
        self._last = domains
        if self._devices is not None and rows is not None:
            self._devices.retain(domains)
        self._fields = {u: n for u, n in self._fields.items() if u in domains}
        stale_names = sorted(d.name for d in domains.values() if d.stale)
        if stale_names:
            log.warning("guests_stale", guests=stale_names)
        ok = rows is not None and host_ok
        if not ok:
            self._instruments.poll_errors.inc()
        duration = self._monotonic() - started
        self._seq += 1
        snap = Snapshot(seq=self._seq, time=self._wall(), duration=duration, domains=domains, host=self._host,
                        sources=self._per_domain.sources())
        self.latest = snap
        self._instruments.poll_duration.observe(duration)
        if ok:
            self._instruments.last_poll_success.set(snap.time)
        if self._on_snapshot is not None:
            self._on_snapshot(snap)
        log.debug("poll_done", guests=len(domains), stale=len(stale_names), duration_seconds=round(duration, 4))
        return snap

    async def _read_jobs(self, end: float) -> None:
        """``jobStats`` of each guest migrating out, on the stats lane, reported to the tracker."""
        assert self._migrations is not None
        for uuid in sorted(self._migrations.outgoing()):
            try:
                active, stats = await self._lanes.run("stats", "jobStats", self._source.job, uuid,
                                                      timeout=max(0.05, end - self._monotonic()))
            except (CallTimeout, LaneUnavailable):
                return
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    active, stats = False, {}
                else:
                    self._per_domain_error("jobStats", err)
                    continue
            self._migrations.on_job(uuid, active, stats, self._wall())

    def _plan(self) -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...]]:
        """This poll's groups (:func:`due_groups`): (due ones and maybe ``host``, groups
        read, groups carried over). Everything is due at the first poll on a connection
        and at the poll after a guest started."""
        due = due_groups(self.settings.groups, self._every, 0 if self._read_all else self._index)
        self._index += 1
        read = tuple(g for g in self.settings.groups if g in due)
        return due, read, tuple(g for g in self.settings.groups if g not in due)

    def _answers(self, rows: list[DomainRow], now: float, carried: tuple[str, ...]) -> dict[str, DomainStats]:
        """This poll's fresh answers by UUID (:meth:`_fresh`); notes whether a guest started."""
        domains = {}
        started = False
        for name, uuid, st in rows:
            last = self._last.get(uuid)
            started = started or (has_figures(st) and (last is None or not has_figures(last.stats)))
            domains[uuid] = self._fresh(name, uuid, st, now, carried)
        # a guest that started has nothing to carry: its other groups come with the next poll
        self._read_all = bool(carried) and started
        return domains

    def _fresh(self, name: str, uuid: str, st: dict[str, Any], now: float,
               carried: tuple[str, ...] = ()) -> DomainStats:
        """This poll's answer of one guest, with its devices; guest-reported memory figures
        older than 3 balloon periods are dropped (:func:`guest_memory_stale`). The
        ``carried`` groups, not read this poll, keep the guest's last figures (none for a
        guest seen for the first time), and the balloon's staleness as judged when read."""
        devices = self._devices.get(uuid) if self._devices is not None else None
        last = self._last.get(uuid)
        if carried and last is not None and has_figures(st):
            st = {**carried_fields(last.stats, carried), **st}
            if "balloon" in carried:
                return DomainStats(name=name, uuid=uuid, stats=st, stale=False, collected_at=now, devices=devices,
                                   memory_stale=last.memory_stale)
        # Its XML not read yet (a first poll, or reads deferred by a slow one): the period is
        # unknown, so the figures are not judged. 3 poll intervals stood in for it and, with a
        # short poll interval, dropped a guest's figures that its 5 s period made current.
        memory_stale = (guest_memory_stale(st, now, devices.balloon_period, self.settings.poll_interval)
                        if devices is not None else None)
        return DomainStats(name=name, uuid=uuid, stats=without_guest_memory(st) if memory_stale else st, stale=False,
                           collected_at=now, devices=devices, memory_stale=memory_stale)

    async def _bulk(self, end: float, flags: int) -> tuple[list[DomainRow] | None, dict[str, dict[str, int]]]:
        """The bulk call on the stats lane: (rows, fields per group of each row by UUID,
        :func:`group_counts`, counted on the lane's thread so that 1,000 guests' keys are
        not scanned on the loop); rows None when it gave nothing this poll.

        The first attempt gets half the poll's budget. When it times out, the
        guests it is stuck on are found (:meth:`_identify`) and a second
        attempt without them gets the rest."""
        exclude = frozenset(self._suspects)
        for attempt in (1, 2):
            remaining = end - self._monotonic()
            deadline = remaining / 2 if attempt == 1 else remaining
            call = "domainListGetStats" if exclude else "getAllDomainStats"
            try:
                return await self._lanes.run("stats", call, _counted, self._source.bulk, exclude, flags,
                                             timeout=max(0.05, deadline))
            except CallTimeout:
                log.warning("poll_timeout", timeout_seconds=round(deadline, 3), attempt=attempt,
                            excluded=len(exclude))
            except LaneUnavailable as err:
                log.warning("poll_no_lane", reason=err.reason)
                return None, {}
            except libvirt.libvirtError as err:
                log.warning("poll_failed", error=str(err).strip(), code=error_code_name(err))
                return None, {}
            if attempt == 2:
                return None, {}
            newly = await self._identify(end, min_ms=deadline * 1000 / 2)
            if not newly:
                return None, {}
            exclude = exclude | newly
        return None, {}

    def _note_fields(self, uuid: str, counts: Mapping[str, int], read: Iterable[str]) -> None:
        """Remember how many fields each group in ``read`` had in a free-monitor answer."""
        ref = self._fields.setdefault(uuid, {})
        for group in read:
            ref[group] = counts.get(group, 0)

    async def _drop_thin(self, rows: list[DomainRow], counts: Mapping[str, Mapping[str, int]], end: float,
                         read: tuple[str, ...]) -> tuple[list[DomainRow], frozenset[str]]:
        """Rows of guests held by somebody else's call, taken out; returns (kept, held).
        ``counts``: each row's fields per group (:func:`group_counts`) by UUID.

        NOWAIT skips, rather than waits for, a guest whose job another call holds.
        When that call is stuck on a hung QEMU (another client's, or ours on a
        quarantined lane), the guest answers without its monitor figures (28 of 53
        fields on QEMU 7.2) and would look fresh. A guest whose answer has fewer
        fields than its last answer given with a free monitor gets one
        ``controlInfo``: while its monitor is occupied (or in error) the row is
        held (stale this poll, last figures kept), and once occupied for half the
        first attempt's deadline the guest becomes a suspect. With the monitor
        free the smaller answer is real (a device went away) and becomes the new
        reference. Fields are counted per group, and only the groups ``read`` this poll
        are compared. A healthy poll makes no extra call."""
        thin = frozenset(uuid for uuid, c in counts.items()
                         if any(c.get(g, 0) < n for g, n in self._fields.get(uuid, {}).items() if g in read))
        for uuid, c in counts.items():
            if uuid not in thin:
                self._note_fields(uuid, c, read)
        if not thin:
            return rows, frozenset()
        min_ms = self.settings.effective_poll_timeout / 2 * 1000 / 2
        try:
            states = await self._control(end, thin)
        except (CallTimeout, LaneUnavailable, libvirt.libvirtError) as err:
            log.debug("thin_check_failed", error=str(err).strip())
            return [r for r in rows if r[1] not in thin], thin  # unknown: not fresh
        held = frozenset(u for u in thin if u in states and states[u].state in (
            libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, libvirt.VIR_DOMAIN_CONTROL_ERROR))
        for uuid in thin - held:
            self._note_fields(uuid, counts[uuid], read)
        self._add_suspects(stuck_guests({u: states[u] for u in held}, min_ms), states,
                           "answered without monitor figures while its monitor is occupied by another call")
        return [r for r in rows if r[1] not in held], held

    async def _identify(self, end: float, min_ms: float) -> frozenset[str]:
        """Suspects added: the running guests whose monitor has been occupied for
        at least ``min_ms`` (control state, read on a fresh stats lane)."""
        try:
            states = await self._control(end)
        except (CallTimeout, LaneUnavailable, libvirt.libvirtError) as err:
            log.warning("stuck_guest_lookup_failed", error=str(err).strip())
            return frozenset()
        stuck = frozenset(stuck_guests(states, min_ms) - set(self._suspects))
        self._add_suspects(stuck, states, "monitor occupied: left out of the bulk call, probed alone")
        return stuck

    async def _control(self, end: float, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        """Control states (of every running guest, or of ``uuids``) on the stats lane, by
        ``end``. Raises CallTimeout, LaneUnavailable or libvirtError."""
        return await self._lanes.run("stats", "controlInfo", self._source.control, uuids,
                                     timeout=max(0.05, end - self._monotonic()))

    def _add_suspects(self, stuck: Iterable[str], states: Mapping[str, ControlState | str], detail: str) -> None:
        """Record ``stuck`` guests as suspects (left out of the bulk call) and log them once;
        ``states`` names them (control states, or names by UUID)."""
        names_by_uuid = {u: s if isinstance(s, str) else s.name for u, s in states.items()}
        names = sorted(names_by_uuid[u] for u in stuck)
        for uuid in stuck:
            self._suspects[uuid] = names_by_uuid[uuid]
        if names:
            log.warning("guests_suspect", guests=names, detail=detail)

    async def _probe(self, suspects: Mapping[str, str],
                     end: float) -> tuple[dict[str, tuple[str, dict[str, Any]]], set[str]]:
        """Probe suspects one by one on the probe lane until one hangs or time is up.

        Returns (answers by UUID as (name, stats), UUIDs of guests that are gone)."""
        answered: dict[str, tuple[str, dict[str, Any]]] = {}
        gone: set[str] = set()
        for uuid in sorted(suspects):
            remaining = end - self._monotonic()
            if remaining <= 0:
                break
            try:
                row = await self._lanes.run("probe", "domainListGetStats", self._source.probe, uuid, self._flags,
                                            timeout=remaining)
            except (CallTimeout, LaneUnavailable):
                break  # that lane is quarantined (or none is left): the rest wait for the next poll
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    gone.add(uuid)
                continue
            if row is None:
                continue
            # bulk fields, asked only once its monitor was free
            self._note_fields(uuid, group_counts(row[2]), self.settings.groups)
            filled = await self._per_domain.fill("probe", [row], end)
            if not filled.rows:
                break  # no time or lane left, or it hung again (still a suspect)
            answered[uuid] = (row[0], filled.rows[0][2])
        return answered, gone

    async def _host_figures(self, end: float) -> bool:
        """Host figures on the host lane; True when fresh ones were read."""
        try:
            host = await self._lanes.run("host", "hostStats", self._source.host, self._host_error,
                                         timeout=max(0.05, end - self._monotonic()))
        except (CallTimeout, LaneUnavailable, libvirt.libvirtError) as err:
            # each host call catches its own errors, so a libvirtError here is the whole call refused
            log.warning("host_stats_failed", error=str(err).strip(),
                        code="timeout" if isinstance(err, CallTimeout)
                        else err.reason if isinstance(err, LaneUnavailable) else error_code_name(err))
            return False
        self._host = dataclasses.replace(host, collected_at=self._wall())
        return True

    def _per_domain_error(self, call: str, err: libvirt.libvirtError) -> None:
        code = error_code_name(err)
        # not supported by this driver, or the guest stopped after isActive(): nothing went wrong
        if code not in ("VIR_ERR_NO_SUPPORT", "VIR_ERR_OPERATION_INVALID"):
            self._instruments.api_errors.labels(call=call, code=code).inc()

    def _host_error(self, call: str, err: libvirt.libvirtError) -> None:
        code = error_code_name(err)
        if code != "VIR_ERR_NO_SUPPORT":
            self._instruments.api_errors.labels(call=call, code=code).inc()


def _counted(conn: Any, bulk: Callable[[Any, frozenset[str], int], list[DomainRow]], exclude: frozenset[str],
             flags: int) -> tuple[list[DomainRow], dict[str, dict[str, int]]]:
    """``bulk(conn, exclude, flags)`` and each row's fields per group by UUID
    (:func:`group_counts`); runs on the stats lane's thread."""
    rows = bulk(conn, exclude, flags)
    return rows, {uuid: group_counts(st) for _n, uuid, st in rows}
