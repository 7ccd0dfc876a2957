"""Per-domain fallback on libvirt's test driver, whose getAllDomainStats returns the state
group only: every running guest still gets CPU, memory, vCPU, disk and NIC figures, from
the classic per-domain calls, through the real poller, lanes and exposition; and those
calls keep the isolation rules of the bulk call (deadline, quarantine, suspects).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import libvirt
import pytest_asyncio

from testkit import PollerRig, labels_of, sample as metric, scrape, until
from virtwatch.app import Daemon
from virtwatch.virt.perdomain import OnError
from virtwatch.virt.stats import ControlState, LibvirtStatsSource, StatsPoller

FALLBACK = ("cpu", "balloon", "vcpu", "interface", "block")


@pytest_asyncio.fixture
async def rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    """1 s poll budget."""
    r = PollerRig(actor, **{"stats.poll_interval": 1.0, "stats.poll_timeout": 1.0, "stats.host": False,
                            "stats.group_intervals": {}})
    yield r
    await r.close()


async def test_cpu_time_of_every_guest_exists_and_grows(daemon: Daemon, make_guests) -> None:
    doms = await asyncio.to_thread(make_guests, "perdom", 3)
    names = [d.name() for d in doms]
    guests = {d.UUIDString() for d in doms}

    def polled_after(seq: int) -> bool:
        snap = daemon.poller.latest
        return snap is not None and snap.seq > seq and guests <= set(snap.domains)

    await until(lambda: polled_after(0), 10, "a poll with the new guests")
    _, first = await scrape(daemon)
    seen = daemon.poller.latest.seq if daemon.poller.latest else 0
    await until(lambda: polled_after(seen), 10, "the next poll")
    _, second = await scrape(daemon)
    for name in names:
        t0 = metric(first, "libvirt_domain_cpu_time_seconds_total", domain=name)
        t1 = metric(second, "libvirt_domain_cpu_time_seconds_total", domain=name)
        assert t0 is not None and t1 is not None and t1 > t0, (name, t0, t1)
        assert metric(second, "libvirt_domain_memory_balloon_current_bytes", domain=name) == 65536 * 1024
        assert metric(second, "libvirt_domain_vcpu_current", domain=name) == 1
        assert metric(second, "libvirt_domain_stats_stale", domain=name) == 0
    # the test driver's own guest has a disk and a NIC
    assert metric(second, "libvirt_domain_block_read_bytes_total", domain="test", target="vda") is not None
    # NICs are keyed by libvirt alias, else MAC (the test driver gives no alias); the tap is in _info
    nic = labels_of(second, "libvirt_domain_interface_info", domain="test", target="testnet0")
    assert nic is not None and nic["device"] == nic["mac"] != ""
    assert metric(second, "libvirt_domain_interface_receive_bytes_total", domain="test",
                  device=nic["device"]) is not None
    assert metric(second, "virtwatch_stats_source", group="state", source="bulk") == 1
    for group in FALLBACK:
        assert metric(second, "virtwatch_stats_source", group=group, source="per_domain") == 1, group
        assert metric(second, "virtwatch_stats_source", group=group, source="bulk") == 0, group


class CountingSource(LibvirtStatsSource):
    """The real source; records control-state lookups and the groups read per domain.
    ``bulk_block`` adds block fields to every bulk answer, as a driver that has them would."""

    BLOCK: ClassVar[dict[str, Any]] = {"block.count": 1, "block.0.name": "vda", "block.0.rd.bytes": 4096}

    def __init__(self, bulk_block: bool = False) -> None:
        self.bulk_block = bulk_block
        self.controls = 0
        self.per_domain_groups: set[tuple[str, ...]] = set()

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list:
        rows = super().bulk(conn, exclude, flags)
        return [(n, u, {**st, **self.BLOCK}) for n, u, st in rows] if self.bulk_block else rows

    def control(self, conn: Any, uuids: frozenset[str] | None = None) -> dict[str, ControlState]:
        self.controls += 1
        return super().control(conn, uuids)

    def per_domain(self, conn: Any, uuid: str, groups: tuple[str, ...], on_error: OnError) -> dict[str, Any]:
        self.per_domain_groups.add(groups)
        return super().per_domain(conn, uuid, groups, on_error)


async def test_state_only_answers_are_not_thin(actor, make_guests, rig: PollerRig) -> None:
    """The thin-answer check compares bulk answers only: the test driver's state-only answer,
    with per-domain figures added after it, never looks like a guest held by another call,
    also when the guest stops (no figures at all) and starts again."""
    (dom,) = await asyncio.to_thread(make_guests, "thin", 1, True)
    uuid = dom.UUIDString()
    source = CountingSource()
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source)
    for _ in range(3):
        snap = await poller.poll_once()
        assert snap is not None and not snap.domains[uuid].stale and "cpu.time" in snap.domains[uuid].stats
    await asyncio.to_thread(dom.destroy)
    snap = await poller.poll_once()
    assert snap is not None and not snap.domains[uuid].stale
    assert set(snap.domains[uuid].stats) == {"state.state", "state.reason"}  # not running: nothing asked
    await asyncio.to_thread(dom.create)
    snap = await poller.poll_once()
    assert snap is not None and not snap.domains[uuid].stale and "cpu.time" in snap.domains[uuid].stats
    assert source.controls == 0
    assert poller.stale == frozenset()
    assert source.per_domain_groups == {FALLBACK}


async def test_a_group_the_bulk_call_returns_is_not_read_per_domain(actor, make_guests, rig: PollerRig) -> None:
    await asyncio.to_thread(make_guests, "bulkblock", 2)
    source = CountingSource(bulk_block=True)
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source)
    snap = await poller.poll_once()
    assert snap is not None
    assert source.per_domain_groups == {("cpu", "balloon", "vcpu", "interface")}
    assert snap.sources == {"state": "bulk", "cpu": "per_domain", "balloon": "per_domain", "vcpu": "per_domain",
                            "interface": "per_domain", "block": "bulk"}
    assert all(d.stats["block.0.rd.bytes"] == 4096 for d in snap.domains.values())  # the bulk call's figure
    # a new connection may be another libvirt: learnt again
    poller.connection_ready(rig.connection.conn)
    source.bulk_block = False
    snap = await poller.poll_once()
    assert snap is not None and snap.sources["block"] == "per_domain"


class HungPerDomainSource(LibvirtStatsSource):
    """A per-domain read that reaches guest ``hung`` blocks until ``release`` is set, the
    way a call into a hung QEMU blocks in libvirtd (the test driver itself never hangs)."""

    def __init__(self, hung: str) -> None:
        self.hung = hung
        self.release = threading.Event()
        self.blocked = 0

    def per_domain(self, conn: Any, uuid: str, groups: tuple[str, ...], on_error: OnError) -> dict[str, Any]:
        if conn.lookupByUUIDString(uuid).name() == self.hung and not self.release.is_set():
            self.blocked += 1
            self.release.wait(30)
        return super().per_domain(conn, uuid, groups, on_error)


async def test_a_hung_per_domain_read_costs_only_its_guest(actor, make_guests, rig: PollerRig) -> None:
    doms = await asyncio.to_thread(make_guests, "pdhang", 3)
    names = sorted(d.name() for d in doms)
    hung = names[0]
    hung_uuid = next(d.UUIDString() for d in doms if d.name() == hung)
    source = HungPerDomainSource(hung)
    walls = iter(range(1000, 2000))
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source,
                         wall=lambda: float(next(walls)))
    try:
        # poll 1: the read of the hung guest outlives the poll's deadline: the stats lane is
        # quarantined and the guest is a suspect; guests not read by then are stale this poll
        snap = await poller.poll_once()
        assert snap is not None
        assert snap.domains[hung_uuid].stale is True
        assert poller.stale == frozenset({hung_uuid})
        assert rig.value("virtwatch_libvirt_lane_quarantines_total", role="stats") == 1
        assert rig.value("libvirt_api_errors_total", call="perDomainStats", code="timeout") == 1

        # poll 2: every other guest is read on a fresh stats lane; the suspect is probed on the
        # probe lane, where its read hangs again: that lane is quarantined, the guest stays stale
        snap = await poller.poll_once()
        assert snap is not None
        by_name = {d.name: d for d in snap.domains.values()}
        for name in names[1:]:
            assert by_name[name].stale is False and "cpu.time" in by_name[name].stats
        assert by_name[hung].stale is True and poller.stale == frozenset({hung_uuid})
        assert rig.value("virtwatch_libvirt_lane_quarantines_total", role="probe") == 1
        assert source.blocked == 2

        # the guest answers: the probe reads it, and it is fresh again
        source.release.set()
        await until(lambda: rig.lanes.quarantined == 0, 5, "the quarantined lanes closed")
        snap = await poller.poll_once()
        assert snap is not None
        assert snap.domains[hung_uuid].stale is False and "cpu.time" in snap.domains[hung_uuid].stats
        assert poller.stale == frozenset()
    finally:
        source.release.set()


async def test_per_domain_reads_follow_the_group_intervals(actor, make_guests) -> None:
    """With balloon and vcpu every 2nd poll, the per-domain reads that stand in for the
    bulk call ask for them every 2nd poll only; between reads their figures are carried,
    never from a stopped guest's last run, and a guest that starts gets every group read
    at the poll after. (The test driver's own guest "test" runs throughout.)"""
    rig = PollerRig(actor, **{"stats.poll_interval": 1.0, "stats.poll_timeout": 1.0, "stats.host": False,
                              "stats.group_intervals": {"balloon": 2.0, "vcpu": 2.0}})
    try:
        (dom,) = await asyncio.to_thread(make_guests, "every2", 1, True)
        uuid = dom.UUIDString()
        source = CountingSource()
        poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=source)
        slow_ones_left = ("cpu", "interface", "block")

        async def poll() -> tuple[set, dict]:
            source.per_domain_groups.clear()
            snap = await poller.poll_once()
            assert snap is not None
            return source.per_domain_groups.copy(), dict(snap.domains[uuid].stats)

        asked = []
        for _ in range(4):
            groups, stats = await poll()
            asked.append(groups)
            assert "balloon.current" in stats and "vcpu.current" in stats  # read or carried
        assert asked == [{FALLBACK}, {slow_ones_left}, {FALLBACK}, {slow_ones_left}]
        assert source.controls == 0  # fewer groups read is not a thin answer
        await asyncio.to_thread(dom.destroy)
        groups, stats = await poll()  # poll 4: stopped, nothing carried (groups: the driver's own guest)
        assert set(stats) == {"state.state", "state.reason"}
        groups, stats = await poll()  # poll 5: still stopped
        assert set(stats) == {"state.state", "state.reason"}
        await asyncio.to_thread(dom.create)
        groups, stats = await poll()  # poll 6 (due anyway)
        assert groups == {FALLBACK} and "vcpu.current" in stats
        await asyncio.to_thread(dom.destroy)
        await poll()  # poll 7
        await asyncio.to_thread(dom.create)
        groups, stats = await poll()  # poll 8 is due: started again, all read
        assert groups == {FALLBACK}
        await asyncio.to_thread(dom.destroy)
        await poll()  # poll 9
        await poll()  # poll 10
        await asyncio.to_thread(dom.create)
        groups, stats = await poll()  # poll 11 is not due: started, so the slow groups are missing once
        assert groups == {slow_ones_left} and "vcpu.current" not in stats and "cpu.time" in stats
        groups, stats = await poll()  # poll 12 reads everything for it
        assert groups == {FALLBACK} and "vcpu.current" in stats
    finally:
        await rig.close()
