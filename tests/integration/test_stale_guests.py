"""One stuck guest costs only itself: its call is isolated on a lane that is
quarantined, the same poll still reads every other guest, later polls leave it
out, and it rejoins as soon as it answers.

The stats source wraps the real test-driver source. Calls that reach a "hung"
guest block until the test releases it, the way a call into a SIGSTOPped QEMU
blocks in libvirtd (the test driver itself never hangs), and while such a call
is in flight the guest's control state reads OCCUPIED, as libvirt reports it
(``virDomainGetControlInfo``; checked on real QEMU in tests/e2e/test_stuck_guests.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import libvirt
import pytest_asyncio

from testkit import PollerRig, until
from virtwatch.virt.stats import ControlState, LibvirtStatsSource, StatsPoller


class HungGuestsSource(LibvirtStatsSource):
    """Blocks any statistics call that reaches a guest named in ``hung`` until
    ``release`` is set; records every call as (kind, sorted guest names)."""

    def __init__(self, hung: set[str]) -> None:
        self.hung = set(hung)
        self.release = threading.Event()
        self.calls: list[tuple[str, list[str]]] = []
        self._occupied_since: dict[str, float] = {}  # name -> monotonic time its monitor got stuck
        self._lock = threading.Lock()

    def _maybe_hang(self, names: list[str]) -> None:
        hit = sorted(n for n in names if n in self.hung and not self.release.is_set())
        if not hit:
            return
        with self._lock:
            self._occupied_since.setdefault(hit[0], time.monotonic())  # libvirt stops at the first one
        self.release.wait(30)
        with self._lock:
            self._occupied_since.pop(hit[0], None)

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list:
        rows = super().bulk(conn, exclude, flags)
        names = sorted(r[0] for r in rows)
        self.calls.append(("some" if exclude else "all", names))
        self._maybe_hang(names)
        return rows

    def control(self, conn: Any, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        out = super().control(conn, uuids)
        with self._lock:
            busy = dict(self._occupied_since)
        for uuid, cs in out.items():
            if cs.name in busy:
                out[uuid] = ControlState(cs.name, uuid, libvirt.VIR_DOMAIN_CONTROL_OCCUPIED,
                                         int((time.monotonic() - busy[cs.name]) * 1000))
        return out

    def probe(self, conn: Any, uuid: str, flags: int) -> Any:
        name = conn.lookupByUUIDString(uuid).name()
        self.calls.append(("probe", [name]))
        with self._lock:
            if name in self._occupied_since:
                return None  # its monitor is still occupied: not asked
        self._maybe_hang([name])
        return super().probe(conn, uuid, flags)


@pytest_asyncio.fixture
async def rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    """1 s poll budget (first attempt 0.5 s), host figures on."""
    r = PollerRig(actor, **{"stats.poll_interval": 1.0, "stats.poll_timeout": 1.0})
    yield r
    await r.close()


def lane_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("virtwatch-lane-")}


async def test_one_hung_guest_costs_only_itself(actor, make_guests, rig: PollerRig) -> None:
    doms = await asyncio.to_thread(make_guests, "stale", 3)
    names = sorted(d.name() for d in doms)
    hung = names[0]
    hung_uuid = next(d.UUIDString() for d in doms if d.name() == hung)
    source = HungGuestsSource({hung})
    walls = iter(range(1000, 2000))
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source,
                         wall=lambda: float(next(walls)))
    try:
        # poll 1: the bulk call hangs on the guest; its lane is quarantined, the guest is
        # named by its control state, and a second bulk call without it reads the others
        snap = await poller.poll_once()
        by_name = {d.name: d for d in snap.domains.values()}
        assert by_name[hung].stale is True
        assert all(by_name[n].stale is False for n in names[1:])
        assert poller.stale == frozenset({hung_uuid})
        assert [c[0] for c in source.calls] == ["all", "some"]
        assert hung not in source.calls[1][1] and set(names[1:]) <= set(source.calls[1][1])
        assert rig.value("virtwatch_libvirt_lane_quarantines_total", role="stats") == 1
        assert rig.value("virtwatch_libvirt_lanes", state="quarantined") == 1
        assert rig.value("libvirt_last_poll_success_timestamp_seconds") == snap.time  # the others were read
        assert snap.host is not None and snap.host.collected_at > 0
        assert any(t.startswith("virtwatch-lane-stats-1") for t in lane_threads())  # held by the stuck call

        # poll 2: only the responsive guests in the bulk call; the probe finds the monitor
        # still occupied and does not ask; the hung guest's figures age
        source.calls.clear()
        snap2 = await poller.poll_once()
        assert ("probe", [hung]) in source.calls
        bulk = [c for c in source.calls if c[0] in ("all", "some")]
        assert len(bulk) == 1 and bulk[0][0] == "some" and hung not in bulk[0][1]
        stuck = {d.name: d for d in snap2.domains.values()}[hung]
        assert stuck.stale is True and stuck.collected_at == by_name[hung].collected_at
        assert all(not d.stale for d in snap2.domains.values() if d.name != hung)
        assert rig.value("virtwatch_libvirt_lanes", state="quarantined") == 1  # no new quarantine

        # the guest answers: the stuck call returns, its lane is closed and counted
        source.release.set()
        await until(lambda: rig.lanes.quarantined == 0, 5, "the quarantined lane closed")
        assert rig.value("virtwatch_libvirt_lanes_recovered_total", role="stats") == 1
        await until(lambda: not any(t.startswith("virtwatch-lane-stats-1") for t in lane_threads()), 5,
                    "the quarantined lane's thread gone")

        # poll 3: the probe reads it (fresh at once); poll 4: back in one getAllDomainStats
        snap3 = await poller.poll_once()
        assert {d.name: d.stale for d in snap3.domains.values()}[hung] is False
        assert poller.stale == frozenset()
        source.calls.clear()
        await poller.poll_once()
        assert [c[0] for c in source.calls] == ["all"]
        assert rig.value("virtwatch_libvirt_lanes", state="active") == 2  # stats, host: the probe lane closed
    finally:
        source.release.set()


async def test_cap_bounds_quarantined_lanes(actor, make_guests) -> None:
    """Three guests hang, max_stuck_lanes = 2: never more than two lanes quarantined;
    past the cap no lane is opened (nothing is read, nothing probed), and everything
    recovers once the guests answer."""
    doms = await asyncio.to_thread(make_guests, "cap", 4)
    names = sorted(d.name() for d in doms)
    source = HungGuestsSource(set())
    rig = PollerRig(actor, **{"stats.poll_interval": 1.0, "stats.poll_timeout": 1.0, "stats.max_stuck_lanes": 2,
                              "stats.host": False})
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source)
    try:
        snap = await poller.poll_once()
        assert {d.name: d.stale for d in snap.domains.values() if d.name in names} == {n: False for n in names}
        source.hung = set(names[:3])
        # stuck on names[0] (quarantined, identified), then on names[1] (quarantined: the cap)
        snap = await poller.poll_once()
        assert rig.lanes.quarantined == 2
        assert {d.name for d in snap.domains.values() if d.name in names and d.stale} == set(names)
        assert rig.value("virtwatch_libvirt_lane_quarantines_total", role="stats") == 2
        for _ in range(3):
            snap = await poller.poll_once()
            assert rig.lanes.quarantined == 2
        assert rig.value("virtwatch_libvirt_lane_unavailable_total", role="stats", reason="cap") == 3
        assert rig.value("virtwatch_libvirt_lane_unavailable_total", role="probe", reason="cap") == 3
        assert [c for c in source.calls if c[0] == "probe"] == []  # past the cap: not probed
        assert {d.name for d in snap.domains.values() if d.name in names and d.stale} == set(names)
        source.release.set()
        await until(lambda: rig.lanes.quarantined == 0, 5, "the quarantined lanes closed")
        assert rig.value("virtwatch_libvirt_lanes_recovered_total", role="stats") == 2
        snap = await poller.poll_once()  # the probe reads the suspect, the bulk call the rest
        assert {d.name: d.stale for d in snap.domains.values() if d.name in names} == {n: False for n in names}
        assert poller.stale == frozenset()
    finally:
        source.release.set()
        await rig.close()


class HeldElsewhereSource(LibvirtStatsSource):
    """One guest's job is held by another client's call stuck on its hung QEMU:
    NOWAIT skips it, so it answers with only the fields that need no job (as
    measured on QEMU 7.2: 28 of 53), and its monitor reads OCCUPIED."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.holding = False
        self.occupied_ms = 30_000
        self.controls: list[frozenset[str] | None] = []

    # The test driver returns the state group only; a QEMU guest also has monitor figures.
    MONITOR: ClassVar[dict[str, Any]] = {"block.count": 1, "block.0.name": "vda", "block.0.rd.bytes": 4096}

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list:
        rows = super().bulk(conn, exclude, flags)
        return [(n, u, st if self.holding and n == self.held else {**st, **self.MONITOR}) for n, u, st in rows]

    def control(self, conn: Any, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        self.controls.append(uuids)
        out = super().control(conn, uuids)
        for uuid, cs in out.items():
            if cs.name == self.held and self.holding:
                out[uuid] = ControlState(cs.name, uuid, libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, self.occupied_ms)
        return out

    def probe(self, conn: Any, uuid: str, flags: int) -> Any:
        return None if self.holding and conn.lookupByUUIDString(uuid).name() == self.held else super().probe(
            conn, uuid, flags)


async def test_guest_held_by_another_clients_stuck_call_is_not_fresh(actor, make_guests, rig: PollerRig) -> None:
    """Another client's call stuck on a guest's hung QEMU: our NOWAIT calls never
    hang on it, but the thin answer must not pass for fresh figures."""
    doms = await asyncio.to_thread(make_guests, "held", 3)
    names = sorted(d.name() for d in doms)
    source = HeldElsewhereSource(names[0])
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source)
    first = await poller.poll_once()
    assert source.controls == []  # nothing shrank: no control-state call at all
    source.holding = True
    source.occupied_ms = 20  # held only just now: not fresh, not yet a suspect
    snap = await poller.poll_once()
    assert {d.name: d.stale for d in snap.domains.values()}[names[0]] is True
    assert poller.stale == frozenset()
    source.occupied_ms = 30_000  # held for long: a suspect, left out of the bulk call
    source.controls.clear()
    snap = await poller.poll_once()
    by_name = {d.name: d for d in snap.domains.values()}
    assert by_name[names[0]].stale is True
    assert poller.stale == frozenset({next(d.UUIDString() for d in doms if d.name() == names[0])})
    assert by_name[names[0]].stats == {d.name: d for d in first.domains.values()}[names[0]].stats  # last full figures
    assert all(not by_name[n].stale for n in names[1:])
    assert len(source.controls) == 1 and source.controls[0] is not None and len(source.controls[0]) == 1
    assert rig.lanes.quarantined == 0  # nothing of ours hung
    source.holding = False
    await poller.poll_once()
    snap = await poller.poll_once()
    assert {d.name: d.stale for d in snap.domains.values()}[names[0]] is False
    assert poller.stale == frozenset()
