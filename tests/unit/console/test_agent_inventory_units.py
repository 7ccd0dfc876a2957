"""Guest agent lane (injected fake connection, real Calls) and the inventory overlay."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import libvirt
from prometheus_client import CollectorRegistry, generate_latest

from testkit import until
from virtwatch.agent.lane import GuestAgent, parse_addresses, parse_guest_info
from virtwatch.agent.settings import AgentSettings
from virtwatch.inventory import Inventory
from virtwatch.metrics.instruments import Instruments
from virtwatch.model import Event
from virtwatch.virt.calls import Calls
from virtwatch.virt.stats import HostStats, NetworkInfo, PoolInfo, Snapshot

RUNNING = libvirt.VIR_DOMAIN_RUNNING


def lv_error(code: int) -> libvirt.libvirtError:
    err = libvirt.libvirtError(f"fake error {code}")
    err.err = (code, 10, f"fake error {code}", 2, None, None, None, -1, -1)
    return err


def test_parse_guest_info_and_addresses() -> None:
    assert parse_guest_info({"hostname": "h", "os.name": "Debian GNU/Linux", "os.version-id": "12",
                             "timezone.name": "UTC", "timezone.offset": 0}) == {
        "hostname": "h", "os_name": "Debian GNU/Linux", "os_version": "12", "timezone": "UTC"}
    assert parse_guest_info({"os.id": "debian", "os.version": "12 (bookworm)"})["os_version"] == "12 (bookworm)"
    addrs = parse_addresses({
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": 0, "addr": "127.0.0.1", "prefix": 8},
                                                       {"type": 1, "addr": "::1", "prefix": 128}]},
        "eth0": {"hwaddr": "52:54:00:00:00:01", "addrs": [{"type": 0, "addr": "198.51.100.2", "prefix": 24},
                                                         {"type": 1, "addr": "fe80::1", "prefix": 64}]},
        "bad": {"addrs": [{"type": 0, "addr": "not-an-ip", "prefix": 1}]},
        "none": None}, "agent")
    assert [(a.interface, a.address, a.family, a.prefix, a.source, a.mac) for a in addrs] == [
        ("eth0", "198.51.100.2", "ipv4", 24, "agent", "52:54:00:00:00:01")]  # fe80::1: link-local, left out


def test_address_filter_defaults_and_settings() -> None:
    """What ``qemu-ga``'s guest-network-get-interfaces reports on a Docker/Kubernetes guest."""
    ifaces = {
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"type": 0, "addr": "127.0.0.1", "prefix": 8}]},
        "eth0": {"hwaddr": "52:54:00:AB:CD:01", "addrs": [
            {"type": 0, "addr": "10.1.2.3", "prefix": 24}, {"type": 1, "addr": "2001:db8::3", "prefix": 64},
            {"type": 1, "addr": "fe80::5054:ff:feab:cd01", "prefix": 64},
            {"type": 0, "addr": "169.254.10.20", "prefix": 16}]},
        "docker0": {"hwaddr": "02:42:9c:00:00:01", "addrs": [{"type": 0, "addr": "172.17.0.1", "prefix": 16}]},
        "br-5e3f2a1b": {"hwaddr": "02:42:9c:00:00:02", "addrs": [{"type": 0, "addr": "172.18.0.1", "prefix": 16}]},
        "veth1a2b3c": {"hwaddr": "8a:11:22:33:44:55", "addrs": [{"type": 1, "addr": "fe80::8811:22ff:fe33:4455",
                                                                 "prefix": 64}]},
        "cni0": {"hwaddr": "0a:58:0a:f4:00:01", "addrs": [{"type": 0, "addr": "10.244.0.1", "prefix": 24}]},
        "flannel.1": {"hwaddr": "0e:0d:0c:0b:0a:09", "addrs": [{"type": 0, "addr": "10.244.0.0", "prefix": 32}]},
    }
    default = parse_addresses(ifaces, "agent")
    assert [(a.interface, a.address, a.mac) for a in default] == [
        ("eth0", "10.1.2.3", "52:54:00:ab:cd:01"), ("eth0", "2001:db8::3", "52:54:00:ab:cd:01")]
    keep_all = AgentSettings(skip_loopback=False, skip_link_local=False, skip_interfaces=()).address_filter
    assert len(parse_addresses(ifaces, "agent", keep_all)) == 10
    only_docker = AgentSettings(skip_interfaces=("docker*",)).address_filter
    assert sorted({a.interface for a in parse_addresses(ifaces, "agent", only_docker)}) == [
        "br-5e3f2a1b", "cni0", "eth0", "flannel.1"]


@dataclasses.dataclass
class G:
    name: str
    uuid: str
    state: int = RUNNING
    agent_connected: bool | None = True


class Guests:
    def __init__(self, *gs: G) -> None:
        self.by = {g.name: g for g in gs}

    def guests(self) -> list[G]:
        return list(self.by.values())

    def by_name(self, name: str) -> G | None:
        return self.by.get(name)


class FakeDom:
    def __init__(self, conn: FakeConn, uuid: str) -> None:
        self.conn, self.uuid = conn, uuid

    def _enter(self, call: str) -> None:
        with self.conn.lock:
            self.conn.active += 1
            self.conn.peak = max(self.conn.peak, self.conn.active)
            self.conn.log.append((call, self.uuid))
        if self.uuid in self.conn.hung and call != "agentSetResponseTimeout":
            self.conn.release.wait(5)

    def _leave(self) -> None:
        with self.conn.lock:
            self.conn.active -= 1

    def guestInfo(self, types: int, flags: int) -> dict[str, Any]:
        self._enter("guestInfo")
        try:
            assert flags == 0 and types & libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
            if self.uuid == "u-noagent":
                raise lv_error(libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)
            return {"hostname": "host-" + self.uuid, "os.name": "Linux", "timezone.name": "UTC"}
        finally:
            self._leave()

    def interfaceAddresses(self, source: int, flags: int) -> dict[str, Any]:
        self._enter("interfaceAddresses")
        try:
            return {"eth0": {"addrs": [{"type": 0, "addr": "10.0.0.5", "prefix": 24}]}}
        finally:
            self._leave()

    def getTime(self, flags: int) -> dict[str, int]:
        self._enter("getTime")
        try:
            return {"seconds": 1010, "nseconds": 500_000_000}
        finally:
            self._leave()

    def agentSetResponseTimeout(self, seconds: int, flags: int) -> int:
        self._enter("agentSetResponseTimeout")
        self.conn.timeouts.append((self.uuid, seconds))
        self._leave()
        return 0


class FakeConn:
    def __init__(self, hung: set[str] | None = None) -> None:
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.log: list[tuple[str, str]] = []
        self.timeouts: list[tuple[str, int]] = []
        self.hung = hung or set()
        self.release = threading.Event()

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        return FakeDom(self, uuid)


async def test_agent_refresh_sets_timeout_and_exports_metrics() -> None:
    guests = Guests(G("a", "u-a"), G("b", "u-noagent"))
    calls = Calls(Instruments(CollectorRegistry()), 4, 5.0)
    agent = GuestAgent(AgentSettings(interval=0.1, timeout=3, startup_delay=0), calls, guests, wall=lambda: 1000.0)
    conn = FakeConn()
    agent.connection_ready(conn)
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await until(lambda: agent.info("a") is not None)
        assert sorted(conn.timeouts) == [("u-a", 3), ("u-noagent", 3)]  # on every guest after connect
        i = agent.info("a")
        assert (i.hostname, i.os_name, i.timezone, i.time_offset) == ("host-u-a", "Linux", "UTC", 10.5)
        assert [(a.interface, a.address, a.source) for a in i.addresses] == [("eth0", "10.0.0.5", "agent")]
        assert agent.info("b") is None  # no agent channel: not retried until the next start
        n = sum(1 for c, u in conn.log if u == "u-noagent")
        await asyncio.sleep(0.35)
        assert sum(1 for c, u in conn.log if u == "u-noagent") == n
        reg = CollectorRegistry()
        reg.register(agent.collector)
        text = generate_latest(reg).decode()
        assert ('libvirt_domain_guest_info{domain="a",hostname="host-u-a",os_name="Linux",os_version="",'
                'timezone="UTC"} 1.0') in text
        assert ('libvirt_domain_interface_address_info'
                '{address="10.0.0.5",domain="a",family="ipv4",interface="eth0",mac=""} 1.0') in text
        assert 'libvirt_domain_guest_time_offset_seconds{domain="a"} 10.5' in text
        agent.on_event(Event(time=1.0, seq=1, source="domain", kind="agent_lifecycle", name="a", uuid="u-a",
                             event="DISCONNECTED", detail="CHANNEL"))
        assert agent.info("a") is None
        assert conn.peak == 1
    finally:
        task.cancel()
        calls.shutdown()


async def test_hung_agent_holds_one_slot_and_others_keep_working() -> None:
    """A hung agent call outlives our deadline: the lane waits for the C call
    (one slot), while other libvirt calls on the same Calls still run."""
    calls = Calls(Instruments(CollectorRegistry()), 4, 5.0)
    guests = Guests(G("hung", "u-hung"), G("ok", "u-ok"))
    conn = FakeConn(hung={"u-hung"})
    agent = GuestAgent(AgentSettings(interval=0.1, timeout=1, startup_delay=0), calls, guests)
    agent.connection_ready(conn)
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await until(lambda: conn.active == 1 and any(u == "u-hung" for _, u in conn.log[2:]))
        # the rest of the daemon is not delayed: another call gets a slot at once
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await calls.run("other", lambda: 42, timeout=1.0) == 42
        assert loop.time() - t0 < 0.5
        await asyncio.sleep(3.5)  # past our deadline (timeout + 2 s): the lane must not start a second call
        assert agent.stuck_calls == 1
        assert conn.peak == 1 and calls.in_flight == 1
        conn.release.set()
        await until(lambda: agent.info("ok") is not None)
        assert conn.peak == 1
    finally:
        conn.release.set()
        task.cancel()
        calls.shutdown()


def test_drift_free_schedule() -> None:
    calls = Calls(Instruments(CollectorRegistry()), 1)
    agent = GuestAgent(AgentSettings(interval=10.0), calls, Guests(), mono=lambda: 0.0)
    calls.shutdown()  # the schedule needs no call
    agent._advance("g", 100.0, 103.0)  # work started 3 s late: next deadline still 110
    assert agent._due["g"] == 110.0
    agent._advance("g", 110.0, 135.5)  # missed two deadlines: skip to the next one ahead, no catch-up burst
    assert agent._due["g"] == 140.0


def _snap(seq: int, t: float, duration: float = 1.0) -> Snapshot:
    host = HostStats(node_info=None, memory=None, cpu=None,
                     pools=(PoolInfo("p1", "pu", 2, 100, 40, 60, True),),
                     networks=(NetworkInfo("default", "nu", True),))
    return Snapshot(seq=seq, time=t, duration=duration, domains={}, host=host)


def ev(source: str, event: str, name: str, t: float) -> Event:
    return Event(time=t, seq=1, source=source, kind=f"{source}_lifecycle", name=name, uuid="x", event=event, detail="")


def test_inventory_overlay_until_a_later_poll() -> None:
    inv = Inventory()
    first = inv.overlay(_snap(1, 100.0))
    assert first.host.pools[0].state == 2 and first.host.networks[0].active
    inv.on_event(ev("storage_pool", "STOPPED", "p1", 105.0))
    inv.on_event(ev("network", "STOPPED", "default", 105.0))
    inv.on_event(ev("network", "STARTED", "new", 106.0))
    inv.on_event(ev("node_device", "CREATED", "usb1", 106.0))
    v = inv.overlay(_snap(1, 100.0))
    assert v.seq != first.seq  # the metrics cache notices
    pool = v.host.pools[0]
    assert (pool.state, pool.active) == (0, False)
    assert [(n.name, n.active) for n in v.host.networks] == [("default", False), ("new", True)]
    assert inv.overlay(_snap(1, 100.0)) is v  # unchanged: same view
    # a poll that began before the events (105.5 - 1.0 < 106) keeps them
    assert [(n.name, n.active) for n in inv.overlay(_snap(2, 105.5)).host.networks] == [
        ("default", False), ("new", True)]
    # a poll that began after them is authoritative again
    assert inv.overlay(_snap(3, 110.0)).host.networks == (NetworkInfo("default", "nu", True),)
    assert inv.overrides() == {"network": {}, "storage_pool": {}}
    inv.on_event(ev("network", "UNDEFINED", "default", 111.0))
    assert inv.overlay(_snap(3, 110.0)).host.networks == ()
    assert inv.counts[("node_device", "CREATED")] == 1
    assert inv.overlay(None) is None
