"""NIC series keyed by alias or MAC, and stale balloon figures dropped, through the real
poller on the test driver: the domain XML is read by libvirt on the stats lane.

The test driver's bulk call answers only the ``state`` group, so the stats source adds
what QEMU's bulk call carries for these guests from the test driver's own per-domain calls
(``interfaceStats`` of each ``<target dev>``, ``memoryStats``), under the bulk call's keys.
The test driver keeps user aliases (``ua-*``) and MACs from the XML, names taps
``testnetN`` and reports a fixed balloon ``last_update`` (627319920); the wall clock is
injected around it.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest_asyncio

from testkit import PollerRig
from virtwatch.metrics.domain import domain_families
from virtwatch.model import Event
from virtwatch.state import GuestView
from virtwatch.virt.devices import DeviceCache
from virtwatch.virt.stats import LibvirtStatsSource, StatsPoller

BALLOON_KEYS = {"unused": "balloon.unused", "available": "balloon.available", "usable": "balloon.usable",
                "disk_caches": "balloon.disk_caches", "swap_in": "balloon.swap_in", "swap_out": "balloon.swap_out",
                "major_fault": "balloon.major_fault", "minor_fault": "balloon.minor_fault",
                "actual": "balloon.current", "rss": "balloon.rss", "last_update": "balloon.last-update"}


def nic_guest_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid><memory>65536</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os><devices>"
            "<interface type='network'><mac address='52:54:00:AA:00:01'/><source network='default'/>"
            "<model type='virtio'/><alias name='ua-uplink'/></interface>"
            "<interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br0'/>"
            "<model type='e1000e'/></interface>"
            "<memballoon model='virtio'><stats period='10'/></memballoon></devices></domain>")


class PerDomainSource(LibvirtStatsSource):
    """The test driver's bulk answer plus, for guests named ``nics-*``, net and balloon
    figures from its per-domain calls; keeps every row it returned in ``rows``."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list:
        out = []
        for name, uuid, st in super().bulk(conn, exclude, flags):
            if name.startswith("nics-") and st.get("state.state") == libvirt.VIR_DOMAIN_RUNNING:
                dom = conn.lookupByUUIDString(uuid)
                taps = [t.get("dev") for t in ET.fromstring(dom.XMLDesc(0)).findall("./devices/interface/target")]
                st = dict(st, **{"net.count": len(taps)})
                for i, tap in enumerate(taps):
                    values = dom.interfaceStats(tap)  # rx bytes, pkts, errs, drop, tx bytes, pkts, errs, drop
                    st[f"net.{i}.name"] = tap
                    for j, key in enumerate(("rx.bytes", "rx.pkts", "rx.errs", "rx.drop",
                                             "tx.bytes", "tx.pkts", "tx.errs", "tx.drop")):
                        st[f"net.{i}.{key}"] = values[j]
                st.update({BALLOON_KEYS[k]: v for k, v in dom.memoryStats().items() if k in BALLOON_KEYS})
                self.rows[name] = st
            out.append((name, uuid, st))
        return out


@pytest_asyncio.fixture
async def rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    """Every group read every poll (``group_intervals = {}``): the balloon is judged at each poll."""
    r = PollerRig(actor, **{"stats.poll_interval": 5.0, "stats.host": False, "stats.group_intervals": {}})
    yield r
    await r.close()


@pytest_asyncio.fixture
async def slow_balloon_rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    """The balloon read every 4th poll (20 s at a 5 s poll)."""
    r = PollerRig(actor, **{"stats.poll_interval": 5.0, "stats.host": False,
                            "stats.group_intervals": {"balloon": 20.0}})
    yield r
    await r.close()


def samples(guests: list[GuestView], snap: Any) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in domain_families(guests, snap) for s in fam.samples}


async def test_nics_keyed_by_alias_or_mac_and_reread_on_device_events(actor, rig: PollerRig) -> None:
    name = f"nics-{uuidlib.uuid4().hex[:8]}"
    dom = await asyncio.to_thread(actor.createXML, nic_guest_xml(name), 0)
    try:
        clock = {"now": 627319920.0 + 5}
        cache = DeviceCache(wall=lambda: clock["now"])
        src = PerDomainSource()
        poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=src,
                             wall=lambda: clock["now"], devices=cache)
        guests = [GuestView(name, dom.UUIDString(), 1, 1)]
        snap = await poller.poll_once()
        st = src.rows[name]
        s = samples(guests, snap)
        assert st["net.0.name"] == "testnet0" and st["net.1.name"] == "testnet1"
        rx = {dict(k[1])["device"]: v for k, v in s.items() if k[0] == "libvirt_domain_interface_receive_bytes_total"
              and ("domain", name) in k[1]}
        assert rx == {"ua-uplink": st["net.0.rx.bytes"], "52:54:00:aa:00:02": st["net.1.rx.bytes"]}
        info = sorted((dict(k[1]) for k in s if k[0] == "libvirt_domain_interface_info"), key=lambda i: i["device"])
        assert info == [
            {"domain": name, "device": "52:54:00:aa:00:02", "target": "testnet1", "mac": "52:54:00:aa:00:02",
             "type": "bridge", "source": "br0", "bridge": "br0", "model": "e1000e"},
            {"domain": name, "device": "ua-uplink", "target": "testnet0", "mac": "52:54:00:aa:00:01",
             "type": "network", "source": "default", "bridge": "", "model": "virtio"},
        ]
        assert cache.reads == 1
        await poller.poll_once()
        assert cache.reads == 1  # nothing changed: not read again
        cache.on_event(Event(0.0, 1, "domain", "device_added", name, dom.UUIDString(), "DEVICE_ADDED", ""))
        snap = await poller.poll_once()
        assert cache.reads == 2
        keys = {dict(k[1])["device"] for k in samples(guests, snap)
                if k[0] == "libvirt_domain_interface_transmit_bytes_total"}
        assert keys == {"ua-uplink", "52:54:00:aa:00:02"}
    finally:
        await asyncio.to_thread(dom.destroy)


async def test_guest_memory_figures_dropped_after_three_balloon_periods(actor, rig: PollerRig) -> None:
    name = f"nics-{uuidlib.uuid4().hex[:8]}"
    dom = await asyncio.to_thread(actor.createXML, nic_guest_xml(name), 0)
    try:
        last = (await asyncio.to_thread(dom.memoryStats))["last_update"]
        clock = {"now": last + 29.0}  # <stats period='10'/>: fresh for 30 s
        src = PerDomainSource()
        poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=src,
                             wall=lambda: clock["now"], devices=DeviceCache(wall=lambda: clock["now"]))
        guests = [GuestView(name, dom.UUIDString(), 1, 1)]
        snap = await poller.poll_once()
        ds = snap.domains[dom.UUIDString()]
        assert ds.devices is not None and ds.devices.balloon_period == 10
        assert ds.memory_stale is False
        s = samples(guests, snap)
        d = (("domain", name),)
        assert s[("libvirt_domain_memory_stats_stale", d)] == 0
        assert s[("libvirt_domain_memory_usable_bytes", d)] == src.rows[name]["balloon.usable"] * 1024

        clock["now"] = last + 31.0
        snap = await poller.poll_once()
        ds = snap.domains[dom.UUIDString()]
        assert ds.memory_stale is True
        assert "balloon.usable" not in ds.stats and ds.stats["balloon.last-update"] == last
        s = samples(guests, snap)
        assert s[("libvirt_domain_memory_stats_stale", d)] == 1
        assert ("libvirt_domain_memory_usable_bytes", d) not in s
        assert ("libvirt_domain_memory_minor_faults_total", d) not in s
        assert s[("libvirt_domain_memory_balloon_current_bytes", d)] == src.rows[name]["balloon.current"] * 1024
    finally:
        await asyncio.to_thread(dom.destroy)


async def test_guest_memory_figures_are_not_judged_before_the_xml_gives_the_period(actor, rig: PollerRig) -> None:
    """Without its live XML (not read yet) a guest's balloon period is unknown: its memory
    figures are kept and not judged, however old its last report."""
    name = f"nics-{uuidlib.uuid4().hex[:8]}"
    dom = await asyncio.to_thread(actor.createXML, nic_guest_xml(name), 0)
    try:
        last = (await asyncio.to_thread(dom.memoryStats))["last_update"]
        src = PerDomainSource()
        poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments, source=src,
                             wall=lambda: last + 3 * rig.settings.stats.poll_interval + 1.0, devices=None)
        snap = await poller.poll_once()
        ds = snap.domains[dom.UUIDString()]
        assert ds.devices is None and ds.memory_stale is None
        assert ds.stats["balloon.usable"] == src.rows[name]["balloon.usable"]
        s = samples([GuestView(name, dom.UUIDString(), 1, 1)], snap)
        d = (("domain", name),)
        assert ("libvirt_domain_memory_stats_stale", d) not in s
        assert s[("libvirt_domain_memory_usable_bytes", d)] == src.rows[name]["balloon.usable"] * 1024
    finally:
        await asyncio.to_thread(dom.destroy)


async def test_a_balloon_read_every_fourth_poll_is_judged_when_read(actor, slow_balloon_rig: PollerRig) -> None:
    """Between balloon reads the last balloon figures and their staleness verdict stand in;
    the verdict changes only at the next read (poll 4), never from the carried figures' age."""
    name = f"nics-{uuidlib.uuid4().hex[:8]}"
    dom = await asyncio.to_thread(actor.createXML, nic_guest_xml(name), 0)
    try:
        last = (await asyncio.to_thread(dom.memoryStats))["last_update"]
        clock = {"now": last + 29.0}
        src = PerDomainSource()
        poller = StatsPoller(slow_balloon_rig.settings.stats, slow_balloon_rig.connection, slow_balloon_rig.lanes,
                             slow_balloon_rig.instruments, source=src, wall=lambda: clock["now"],
                             devices=DeviceCache(wall=lambda: clock["now"]))
        uuid = dom.UUIDString()
        snap = await poller.poll_once()
        assert snap.domains[uuid].memory_stale is False
        usable = snap.domains[uuid].stats["balloon.usable"]
        clock["now"] = last + 31.0  # the report is now older than 3 periods, but nobody read it
        for _ in range(3):  # polls 1..3: the balloon is carried over
            snap = await poller.poll_once()
            ds = snap.domains[uuid]
            assert ds.memory_stale is False and ds.stats["balloon.usable"] == usable
            assert "cpu.time" in ds.stats  # read every poll
        snap = await poller.poll_once()  # poll 4: read, and judged stale
        ds = snap.domains[uuid]
        assert ds.memory_stale is True and "balloon.usable" not in ds.stats
        assert ds.stats["balloon.last-update"] == last
    finally:
        await asyncio.to_thread(dom.destroy)
