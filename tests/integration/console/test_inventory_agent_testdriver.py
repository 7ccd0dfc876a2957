"""Inventory overlay, guest agent and console capture wiring, on the test driver.

The daemon is built exactly as the CLI builds it (``Daemon``); a second
connection (``actor``) changes networks, pools and guests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from testkit import rendered, sample as value, scrape, until
from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.control import request
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl

TEST_URI = "test:///default"


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


@pytest_asyncio.fixture
async def rw_daemon(event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path) -> AsyncIterator[Daemon]:
    """Read-write daemon, a long poll interval (so only events can move the
    inventory), agent refresh every 0.2 s, console capture of ``cons-*``."""
    settings = load_settings(None, {
        "libvirt.uri": TEST_URI, "libvirt.read_only": "no", "http.listen": "127.0.0.1:0",
        "stats.poll_interval": 600.0, "log.events": False, "daemon.state_dir": str(tmp_path),
        "daemon.socket": str(tmp_path / "vw.sock"),
        "agent.interval": 0.2, "agent.startup_delay": 0.0,
        "console.enabled": True, "console.guests": ["cons-*"], "console.reattach_min_delay": 0.05,
        "console.reattach_max_delay": 0.2,
    })
    d = Daemon(settings, event_impl)
    await d.start()
    await d.connection.ready.wait()
    await until(lambda: d.poller.latest is not None)
    yield d
    await d.stop()


def net_xml(name: str) -> str:
    return (f"<network><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
            "<bridge name='vwtest0'/><ip address='10.99.0.1' netmask='255.255.255.0'/></network>")


async def test_network_and_pool_events_show_before_the_next_poll(rw_daemon: Daemon, actor: libvirt.virConnect) -> None:
    d = rw_daemon
    seq_before = d.poller.latest.seq
    _, text = await scrape(d)
    assert value(text, "libvirt_storage_pool_state", pool="default-pool") == 2
    assert value(text, "libvirt_network_active", network="default") == 1

    pool = actor.storagePoolLookupByName("default-pool")
    net = actor.networkLookupByName("default")
    name = f"vwnet-{uuid.uuid4().hex[:6]}"
    try:
        await asyncio.to_thread(pool.destroy)
        await asyncio.to_thread(net.destroy)
        transient = await asyncio.to_thread(actor.networkCreateXML, net_xml(name))
        await until(lambda: d.inventory.counts.get(("network", "STARTED"), 0) >= 1
                    and d.inventory.counts.get(("storage_pool", "STOPPED"), 0) >= 1
                    and d.inventory.counts.get(("network", "STOPPED"), 0) >= 1)
        await rendered(d)  # the events started it: a scrape answers the latest finished render
        _, text = await scrape(d)
        assert value(text, "libvirt_storage_pool_state", pool="default-pool") == 0
        assert value(text, "libvirt_storage_pool_capacity_bytes", pool="default-pool") is None  # inactive: no sizes
        assert value(text, "libvirt_network_active", network="default") == 0
        assert value(text, "libvirt_network_active", network=name) == 1
        await asyncio.to_thread(transient.destroy)
        await until(lambda: d.inventory.counts.get(("network", "STOPPED"), 0) >= 2)
        await rendered(d)
        _, text = await scrape(d)
        assert value(text, "libvirt_network_active", network=name) == 0
        assert d.poller.latest.seq == seq_before  # no poll ran: the events did it
    finally:
        for obj in (pool, net):
            try:
                await asyncio.to_thread(obj.create)
            except libvirt.libvirtError:
                pass
    await until(lambda: d.inventory.counts.get(("storage_pool", "STARTED"), 0) >= 1
                and d.inventory.counts.get(("network", "STARTED"), 0) >= 2)  # the transient one, then default
    await rendered(d)
    _, text = await scrape(d)
    assert value(text, "libvirt_storage_pool_state", pool="default-pool") == 2
    assert value(text, "libvirt_network_active", network="default") == 1
    ev_total = value(text, "libvirt_events_total", kind="storage_pool_lifecycle", event="STOPPED", detail="")
    assert ev_total is not None and ev_total >= 1


def nic_guest_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid4()}</uuid><memory>65536</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os><devices><interface type='network'>"
            "<source network='default'/><mac address='52:54:00:12:34:56'/></interface></devices></domain>")


async def test_agent_addresses_and_time_offset_from_the_test_driver(rw_daemon: Daemon,
                                                                    actor: libvirt.virConnect) -> None:
    """The test driver answers interfaceAddresses (a synthetic 192.168.122.x
    per NIC, for its one NIC: .23) and getTime (a fixed 1989 clock), not
    guestInfo (VIR_ERR_NO_SUPPORT) nor agentSetResponseTimeout."""
    d = rw_daemon
    name = f"agt-{uuid.uuid4().hex[:6]}"
    dom = await asyncio.to_thread(actor.createXML, nic_guest_xml(name), 0)
    await until(lambda: d.agent.info(name) is not None and d.agent.info(name).time_offset is not None)
    info = d.agent.info(name)
    # the test driver derives the address from the domain id, which depends on how many
    # guests the shared driver made before: compare with what libvirt answers directly
    direct = await asyncio.to_thread(dom.interfaceAddresses, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
    expected = [(iface, a["addr"], "ipv4", a["prefix"], "agent") for iface, v in direct.items() for a in v["addrs"]]
    assert len(expected) == 1 and expected[0][0] == "testnet0" and expected[0][1].startswith("192.168.122.")
    assert [(a.interface, a.address, a.family, a.prefix, a.source) for a in info.addresses] == expected
    guest_clock = (await asyncio.to_thread(dom.getTime))["seconds"]
    assert abs(info.time_offset - (guest_clock - time.time())) < 5
    assert info.errors.get("guestInfo") == "VIR_ERR_NO_SUPPORT"
    assert info.hostname is None
    _, text = await scrape(d)
    assert value(text, "libvirt_domain_interface_address_info", domain=name, interface="testnet0",
                 address=expected[0][1], family="ipv4") == 1
    off = value(text, "libvirt_domain_guest_time_offset_seconds", domain=name)
    assert off is not None and off < -1e8
    assert value(text, "libvirt_domain_guest_info", domain=name) is None  # no guestInfo: no info series
    assert d.agent.max_in_flight_seen == 1  # one call slot at most
    status, body = await scrape(d, f"/api/v1/guests/{name}")
    assert status == 200 and f'"{expected[0][1]}"' in body
    # refreshes follow the schedule (every 0.2 s)
    n = d.agent.refreshes
    await asyncio.sleep(0.7)
    assert d.agent.refreshes - n >= 2
    await asyncio.to_thread(dom.destroy)
    await until(lambda: d.agent.info(name) is None)
    _, text = await scrape(d)
    assert value(text, "libvirt_domain_interface_address_info", domain=name) is None


async def test_console_on_a_driver_without_consoles_backs_off_quietly(rw_daemon: Daemon, make_guests) -> None:
    d = rw_daemon
    (dom,) = await asyncio.to_thread(make_guests, "cons", 1, False)
    name = dom.name()
    await until(lambda: (d.console.state(name) or {}).get("last_error") == "VIR_ERR_NO_SUPPORT")
    assert d.console.attached() == []
    # console contents are read over the operator socket; HTTP does not serve them by default
    status, body = await asyncio.to_thread(request, d.settings.daemon.socket, "GET", f"/v1/guests/{name}/console")
    assert status == 200 and body["lines"] == [] and body["capture"]["last_error"] == "VIR_ERR_NO_SUPPORT"
    status, _ = await asyncio.to_thread(request, d.settings.daemon.socket, "GET", "/v1/guests/not-captured/console")
    assert status == 404
    assert (await scrape(d, f"/api/v1/guests/{name}/console"))[0] == 404
    # no crash yet: no crash store on disk (it is made by the first crash record)
    assert not (Path(d.settings.daemon.state_dir) / "console.sqlite").exists()
