"""The living demo, end to end on libvirt's in-process test driver: the daemon as
``./dev.sh run`` builds it (config/virtwatch.demo.toml on config/demo-host.xml, a
private host per connection), and on the shared ``test:///default``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest_asyncio

from testkit import labels_of, sample as metric, scrape, until
from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl

ROOT = Path(__file__).resolve().parents[2]
DEMO_GUESTS = ("batch1", "build-runner", "db1", "web1", "web2")
FALLBACK = ("cpu", "balloon", "vcpu", "interface", "block")


def demo_settings(tmp_path: Path, **overrides: Any) -> Any:
    """config/virtwatch.demo.toml with dev.sh's URI, files in ``tmp_path``, an ephemeral port."""
    return load_settings(ROOT / "config" / "virtwatch.demo.toml", {
        "libvirt.uri": f"test://{ROOT / 'config' / 'demo-host.xml'}", "http.listen": "127.0.0.1:0",
        "daemon.state_dir": str(tmp_path / "state"), "daemon.socket": str(tmp_path / "v.sock"),
        "log.events": False, **overrides})


@pytest_asyncio.fixture
async def make_daemon(event_impl: ThreadSafeAsyncIOImpl) -> AsyncIterator[Any]:
    started: list[Daemon] = []

    async def make(settings: Any) -> Daemon:
        d = Daemon(settings, event_impl)
        started.append(d)
        await d.start()
        await d.connection.ready.wait()
        return d

    yield make
    for d in started:
        await d.stop()


async def next_poll(d: Daemon) -> None:
    seen = d.poller.latest.seq if d.poller.latest else 0
    await until(lambda: d.poller.latest is not None and d.poller.latest.seq > seen, 10, "a new poll")


async def test_dev_sh_run_shows_cpu_time_for_every_demo_guest(make_daemon, tmp_path: Path) -> None:
    """What a new user sees: every demo guest's CPU time, and it grows between two scrapes
    (the demo's first action is 10 s away, so all five still run)."""
    d = await make_daemon(demo_settings(tmp_path, **{"stats.poll_interval": 0.3}))
    assert d.settings.demo.enabled and d.demo is not None and d.demo_side is None  # acts on the main connection
    await next_poll(d)
    _, first = await scrape(d)
    await next_poll(d)
    _, second = await scrape(d)
    for name in DEMO_GUESTS:
        t0 = metric(first, "libvirt_domain_cpu_time_seconds_total", domain=name)
        t1 = metric(second, "libvirt_domain_cpu_time_seconds_total", domain=name)
        assert t0 is not None and t1 is not None and t1 > t0, (name, t0, t1)
        assert metric(second, "libvirt_domain_block_read_bytes_total", domain=name, target="vda") is not None
        # NICs are keyed by libvirt alias, else MAC (the test driver gives no alias); the tap is in _info
        nic = labels_of(second, "libvirt_domain_interface_info", domain=name, target="testnet0")
        assert nic is not None and nic["device"] == nic["mac"] != ""
        assert metric(second, "libvirt_domain_interface_receive_bytes_total", domain=name,
                      device=nic["device"]) is not None
    assert metric(second, "libvirt_domain_memory_balloon_current_bytes", domain="db1") == 4194304 * 1024
    for group in FALLBACK:
        assert metric(second, "virtwatch_stats_source", group=group, source="per_domain") == 1, group
    # the status page's CPU % and memory
    _, body = await scrape(d, "/api/v1/guests/web1")
    doc = json.loads(body)
    assert doc["cpu_percent"] is not None and doc["cpu_percent"] > 0
    assert doc["memory_balloon_current_bytes"] == 1048576 * 1024
    assert d.demo.steps == []


async def test_the_demo_fills_the_events_list_on_its_schedule(make_daemon, tmp_path: Path) -> None:
    d = await make_daemon(demo_settings(tmp_path, **{"demo.min_interval": 0.05, "demo.max_interval": 0.1}))
    assert d.demo is not None
    took = await until(lambda: len(d.recent.since(0)) > 0, 5, "a first event")
    assert took < 0.1 + 1.0  # the first action comes after one pause of at most max_interval
    await until(lambda: len(d.demo.steps) >= 6, 10, "six demo actions")  # type: ignore[union-attr]
    await until(lambda: len(d.recent.since(0)) >= 6, 5, "their events")
    steps = list(d.demo.steps[:6])
    assert [s.action for s in steps] == ["pause", "resume", "shutdown", "start", "destroy", "start"]
    events = [(e.name, e.event, e.detail) for e in d.recent.since(0)][:6]
    assert events == [(steps[0].guest, "SUSPENDED", "PAUSED"), (steps[1].guest, "RESUMED", "UNPAUSED"),
                      (steps[2].guest, "STOPPED", "SHUTDOWN"), (steps[3].guest, "STARTED", "BOOTED"),
                      (steps[4].guest, "STOPPED", "DESTROYED"), (steps[5].guest, "STARTED", "BOOTED")]
    assert len({s.guest for s in steps[::2]}) == 3  # a different guest each turn
    # state reasons come with the events: no guest the demo touched reads "unknown" (0) any more
    # (running booted or unpaused, paused by the user, shut off by shutdown or destroy)
    for guest in {s.guest for s in steps}:
        g = d.guests.by_name(guest)
        assert g is not None and g.reason != 0, (guest, g)
    _, text = await scrape(d)
    assert metric(text, "libvirt_events_total", kind="lifecycle", event="STOPPED", detail="DESTROYED") >= 1
    _, body = await scrape(d, "/api/v1/events?since=0")
    assert len(json.loads(body)["events"]) >= 6


async def test_on_the_shared_test_driver_the_demo_has_its_own_connection(make_daemon, make_guests, tmp_path: Path,
                                                                         actor: libvirt.virConnect) -> None:
    doms = await asyncio.to_thread(make_guests, "demo", 2, True)
    (bystander,) = await asyncio.to_thread(make_guests, "bystander", 1, True)
    settings = load_settings(None, {"libvirt.uri": "test:///default", "http.listen": "127.0.0.1:0",
                                    "stats.poll_interval": 0.5, "log.events": False, "demo.enabled": True,
                                    "demo.min_interval": 0.05, "demo.max_interval": 0.1,
                                    "demo.guests": [f"{doms[0].name()[:5]}*"]})
    d = await make_daemon(settings)
    assert d.demo is not None and d.demo_side is not None
    await until(lambda: d.demo_side.conn is not None, 5, "the demo's connection")  # type: ignore[union-attr]
    assert d.demo_side.conn is not d.connection.conn
    names = {dom.name() for dom in doms}
    await until(lambda: len({e.event for e in d.recent.since(0) if e.name in names}) >= 4, 10,
                "suspended, resumed, stopped and started")
    assert {s.guest for s in d.demo.steps} <= names
    assert not [e for e in d.recent.since(0) if e.name == bystander.name()]
    assert await asyncio.to_thread(lambda: bystander.state()[0]) == libvirt.VIR_DOMAIN_RUNNING
