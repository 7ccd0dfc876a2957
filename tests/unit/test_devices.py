"""Live domain XML → NICs and balloon period; the stale-balloon decision; the device cache.

The QEMU XML below is the shape libvirt 9.0 writes for a running guest's live definition
(``virsh dumpxml`` of a started guest: libvirt adds ``<target dev>``, ``<alias>``, the
MAC and, for ``network`` interfaces, the bridge and port id). The test-driver XML is read
from libvirt itself. Balloon values come from tests/fixtures (real libvirt 9.0 / QEMU 7.2
guests with ``<stats period='2'/>``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from virtwatch.model import Event
from virtwatch.virt.devices import (
    GUEST_MEMORY_KEYS,
    DeviceCache,
    DomainDevices,
    Interface,
    guest_memory_stale,
    net_names,
    parse_devices,
    without_guest_memory,
)


def qemu_xml(taps: tuple[str, str, str] = ("vnet8", "vnet9", "vnet10"), period: int | None = 2) -> str:
    """A running QEMU guest's live XML with three NICs (network, bridge with a user alias,
    ethernet) and a virtio balloon."""
    stats = f"<stats period='{period}'/>" if period is not None else ""
    return f"""<domain type='qemu' id='7'><name>web1</name>
  <uuid>6d658619-6927-4b55-a055-c93104410beb</uuid>
  <devices>
    <interface type='network'>
      <mac address='52:54:00:6B:3C:1F'/>
      <source network='default' portid='1f0c46d2-2b8e-4bd4-9b9c-4f7b3c1e9a10' bridge='virbr0'/>
      <target dev='{taps[0]}'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:11:22:33'/>
      <source bridge='br-uplink'/>
      <target dev='{taps[1]}'/>
      <model type='e1000e'/>
      <alias name='ua-uplink'/>
    </interface>
    <interface type='ethernet'>
      <mac address='52:54:00:44:55:66'/>
      <source><ip address='198.51.100.1' family='ipv4' prefix='24'/></source>
      <target dev='{taps[2]}' managed='yes'/>
      <model type='virtio'/>
      <alias name='net2'/>
    </interface>
    <memballoon model='virtio'>
      {stats}
      <alias name='balloon0'/>
    </memballoon>
  </devices>
</domain>"""


def test_qemu_live_xml_gives_alias_mac_tap_source_and_model() -> None:
    d = parse_devices(qemu_xml())
    assert d.interfaces == (
        Interface("net0", "52:54:00:6b:3c:1f", "vnet8", "network", "default", "virbr0", "virtio"),
        Interface("ua-uplink", "52:54:00:11:22:33", "vnet9", "bridge", "br-uplink", "br-uplink", "e1000e"),
        Interface("net2", "52:54:00:44:55:66", "vnet10", "ethernet", "", "", "virtio"),
    )
    assert [n.key for n in d.interfaces] == ["net0", "ua-uplink", "net2"]
    assert d.balloon_period == 2
    assert d.interface("vnet9") is d.interfaces[1]
    assert d.interface("vnet99") is None


def test_test_driver_xml_has_no_alias_so_the_mac_is_the_key() -> None:
    conn = libvirt.open("test:///default")
    try:
        d = parse_devices(conn.lookupByName("test").XMLDesc(0))
    finally:
        conn.close()
    assert d.interfaces == (Interface("", "aa:bb:cc:dd:ee:ff", "testnet0", "network", "default", "", ""),)
    assert d.interfaces[0].key == "aa:bb:cc:dd:ee:ff"
    assert d.balloon_period == 0  # <memballoon model='virtio'> without <stats>


def test_balloon_period_absent_zero_or_no_balloon() -> None:
    assert parse_devices(qemu_xml(period=None)).balloon_period == 0
    assert parse_devices(qemu_xml(period=0)).balloon_period == 0
    none = "<domain><devices><memballoon model='none'/></devices></domain>"
    assert parse_devices(none) == DomainDevices((), None)
    assert parse_devices("<domain><devices/></domain>") == DomainDevices((), None)


def _recorded(recorded_domstats: dict, name: str) -> dict:
    return next(d for d in recorded_domstats["domains"] if d["name"] == name)["stats"]


def test_stale_after_three_periods_by_the_recorded_last_update(recorded_domstats: dict) -> None:
    b01 = _recorded(recorded_domstats, "b01")
    last = b01["balloon.last-update"]  # 1795959522, seconds since the epoch
    # period 2 s: 3 periods = 6 s
    assert guest_memory_stale(b01, last + 1.0, 2, 15.0) is False
    assert guest_memory_stale(b01, last + 6.0, 2, 15.0) is False
    assert guest_memory_stale(b01, last + 6.5, 2, 15.0) is True
    # no period (set to 0, or unknown): 3 poll intervals
    assert guest_memory_stale(b01, last + 45.0, 0, 15.0) is False
    assert guest_memory_stale(b01, last + 45.5, 0, 15.0) is True
    assert guest_memory_stale(b01, last + 45.5, None, 15.0) is True
    # the figure a guest shows when its period was raised to 60 s is fresh for 3 minutes
    assert guest_memory_stale(b01, last + 179.0, 60, 15.0) is False


def test_nothing_to_judge_without_a_last_update(recorded_domstats: dict) -> None:
    off = _recorded(recorded_domstats, "ev-panic")  # shut off: balloon.current/maximum only
    assert "balloon.last-update" not in off
    assert guest_memory_stale(off, 1795959522.0, 2, 15.0) is None
    assert guest_memory_stale({"balloon.last-update": 0}, 1795959522.0, 2, 15.0) is None


def test_dropping_keeps_host_side_figures_and_the_timestamp(recorded_domstats: dict) -> None:
    b01 = _recorded(recorded_domstats, "b01")
    kept = without_guest_memory(b01)
    assert set(b01) - set(kept) == set(GUEST_MEMORY_KEYS)  # all ten were in the recorded answer
    for key in ("balloon.current", "balloon.maximum", "balloon.rss", "balloon.last-update", "cpu.time",
                "net.0.rx.bytes"):
        assert kept[key] == b01[key]


def test_net_names_from_the_recorded_stats(recorded_domstats: dict) -> None:
    assert net_names(_recorded(recorded_domstats, "b01")) == {"vnet8"}
    assert net_names(_recorded(recorded_domstats, "ev-panic")) == frozenset()


def _ev(kind: str, event: str, uuid: str = "u1") -> Event:
    return Event(time=0.0, seq=1, source="domain", kind=kind, name="web1", uuid=uuid, event=event, detail="")


def _stats(*taps: str, last_update: int | None = None) -> dict:
    st: dict = {"net.count": len(taps)}
    for i, tap in enumerate(taps):
        st[f"net.{i}.name"] = tap
        st[f"net.{i}.rx.bytes"] = 1000 + i
    if last_update is not None:
        st["balloon.last-update"] = last_update
    return st


def test_cache_reads_once_then_again_on_new_taps_events_and_age() -> None:
    cache = DeviceCache(max_age=600.0)
    st = _stats("vnet8", "vnet9", "vnet10")
    assert cache.wanted([("u1", st)], 1000.0, 15.0) == ["u1"]  # never read
    cache.store("u1", parse_devices(qemu_xml()), net_names(st), 1000.0)
    assert cache.wanted([("u1", st)], 1001.0, 15.0) == []
    # restarted without an event seen: new taps in the stats → read again
    restarted = _stats("vnet20", "vnet21", "vnet22")
    assert cache.wanted([("u1", restarted)], 1002.0, 15.0) == ["u1"]
    # a tap the XML does not list, read for exactly these names: not read at every poll
    cache.store("u1", parse_devices(qemu_xml(("vnet20", "vnet21", "vnet30"))), net_names(restarted), 1002.0)
    assert cache.wanted([("u1", restarted)], 1003.0, 15.0) == []
    # events: a start or a hot-plug marks it; a stop forgets it
    cache.on_event(_ev("device_added", "DEVICE_ADDED"))
    assert cache.wanted([("u1", restarted)], 1004.0, 15.0) == ["u1"]
    cache.store("u1", parse_devices(qemu_xml(("vnet20", "vnet21", "vnet22"))), net_names(restarted), 1004.0)
    cache.on_event(_ev("lifecycle", "SUSPENDED"))
    assert cache.wanted([("u1", restarted)], 1005.0, 15.0) == []
    cache.on_event(_ev("lifecycle", "STOPPED"))
    assert cache.get("u1") is None
    cache.store("u1", parse_devices(qemu_xml(("vnet20", "vnet21", "vnet22"))), net_names(restarted), 1006.0)
    assert cache.wanted([("u1", restarted)], 1006.0 + 600.5, 15.0) == ["u1"]  # older than max_age
    # a guest without NICs or balloon figures (shut off) needs nothing
    assert cache.wanted([("u2", {"state.state": 5})], 1006.0, 15.0) == []


def test_cache_rereads_once_when_the_balloon_turns_stale() -> None:
    """``dommemstat --period`` sends no event: a guest that looks stale by the cached period
    has its XML read once after it turned stale (the period may have grown), not at every poll."""
    cache = DeviceCache()
    st = _stats("vnet8", "vnet9", "vnet10", last_update=5000)
    cache.store("u1", parse_devices(qemu_xml(period=2)), net_names(st), 5000.0)
    assert cache.wanted([("u1", st)], 5006.0, 1.0) == []       # 6 s = 3 periods: fresh
    assert cache.wanted([("u1", st)], 5007.0, 1.0) == ["u1"]   # stale since 5006, read at 5000
    cache.store("u1", parse_devices(qemu_xml(period=0)), net_names(st), 5007.0)
    assert cache.wanted([("u1", st)], 5008.0, 1.0) == []       # read after it turned stale


def test_connection_ready_forgets_everything() -> None:
    cache = DeviceCache()
    cache.store("u1", parse_devices(qemu_xml()), frozenset({"vnet8"}), 1.0)
    cache.connection_ready(object())
    assert cache.get("u1") is None


@pytest.mark.parametrize("bad", ["<domain>", ""])
def test_malformed_xml_raises(bad: str) -> None:
    with pytest.raises(ET.ParseError):
        parse_devices(bad)
