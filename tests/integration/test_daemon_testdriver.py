"""The daemon on libvirt's in-process test driver: events, state, HTTP, reconnect."""

from __future__ import annotations

import asyncio
import json
import resource

import aiohttp
import libvirt
import yarl

from testkit import sample as metric, scrape, until
from virtwatch.alerts.config import AlertSettings
from virtwatch.app import Daemon
from virtwatch.config import load_settings


async def test_lifecycle_events_reach_state_counters_and_api(daemon: Daemon, make_guests, actor) -> None:
    (dom,) = await asyncio.to_thread(make_guests, "life", 1, True)
    name = dom.name()
    await until(lambda: daemon.guests.by_name(name) is not None)
    await asyncio.to_thread(dom.suspend)
    await until(lambda: daemon.guests.by_name(name).state == libvirt.VIR_DOMAIN_PAUSED)
    await asyncio.to_thread(dom.resume)
    await asyncio.to_thread(dom.destroy)
    await until(lambda: daemon.guests.by_name(name).state == libvirt.VIR_DOMAIN_SHUTOFF)
    g = daemon.guests.by_name(name)
    assert (g.last_event, g.last_detail) == ("STOPPED", "DESTROYED")
    assert g.reason == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED

    status, text = await scrape(daemon)
    assert status == 200
    assert metric(text, "libvirt_up") == 1
    assert metric(text, "libvirt_events_total", kind="lifecycle", event="SUSPENDED", detail="PAUSED") >= 1
    assert metric(text, "libvirt_events_total", kind="lifecycle", event="STOPPED", detail="DESTROYED") >= 1
    assert metric(text, "libvirt_domain_state_code", domain=name) == 5

    status, body = await scrape(daemon, f"/api/v1/guests/{name}")
    assert status == 200
    doc = json.loads(body)
    assert doc["state"] == "shutoff" and doc["reason"] == "destroyed"
    assert [(e["event"], e["detail"]) for e in doc["events"]][-3:] == [
        ("SUSPENDED", "PAUSED"), ("RESUMED", "UNPAUSED"), ("STOPPED", "DESTROYED")]
    status, body = await scrape(daemon, "/api/v1/guests/no-such-guest")
    assert status == 404
    status, body = await scrape(daemon, "/api/v1/events?since=0&limit=2")
    assert status == 200 and len(json.loads(body)["events"]) == 2
    status, body = await scrape(daemon, "/api/v1/events?since=abc")
    assert status == 400


async def test_landing_health_and_readiness(daemon: Daemon, make_guests) -> None:
    (dom,) = await asyncio.to_thread(make_guests, "odd<&>name", 1)
    await until(lambda: daemon.guests.by_name(dom.name()) is not None)
    status, page = await scrape(daemon, "/")
    assert status == 200
    assert "odd&lt;&amp;&gt;name" in page and "<table>" in page
    assert (await scrape(daemon, "/healthz"))[0] == 200
    assert (await scrape(daemon, "/readyz"))[0] == 200


async def test_an_alert_link_opens_the_guest_page_even_for_an_odd_name(daemon: Daemon, make_guests) -> None:
    (dom,) = await asyncio.to_thread(make_guests, "odd name?#%ü&", 1)  # libvirt refuses only '/' and newlines
    name = dom.name()
    await until(lambda: daemon.guests.by_name(name) is not None)
    host, port = daemon.listen_address
    link = AlertSettings(external_url=f"http://{host}:{port}").link(name)
    assert link is not None and " " not in link and "?" not in link and "#" not in link
    async with aiohttp.ClientSession() as s, s.get(yarl.URL(link, encoded=True)) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["name"] == name


async def test_poll_publishes_snapshot_and_vanished_guests_vanish(daemon: Daemon, make_guests) -> None:
    doms = await asyncio.to_thread(make_guests, "poll", 3)
    names = {d.name() for d in doms}

    def polled() -> bool:
        snap = daemon.poller.latest
        return snap is not None and names <= {d.name for d in snap.domains.values()}

    await until(polled)  # the poller runs every 0.5 s
    snap = daemon.poller.latest
    _, text = await scrape(daemon)
    assert all(metric(text, "libvirt_domain_stats_stale", domain=n) == 0 for n in names)
    assert metric(text, "libvirt_last_poll_success_timestamp_seconds") >= snap.time - 1
    gone = doms[0]
    await asyncio.to_thread(gone.destroy)  # transient: disappears
    await until(lambda: daemon.guests.by_name(gone.name()) is None)
    _, text = await scrape(daemon)
    assert f'domain="{gone.name()}"' not in text


class _RaisingCollector:
    """A collector with a bug: ``collect`` raises."""

    def collect(self):
        """Raise, as a buggy collector does."""
        raise RuntimeError("collector bug")

    def describe(self):
        """No up-front description."""
        return []


async def test_a_broken_collector_never_fails_the_scrape(daemon: Daemon, make_guests) -> None:
    (dom,) = await asyncio.to_thread(make_guests, "scrape", 1)
    name = dom.name()
    await until(lambda: daemon.guests.by_name(name) is not None)
    broken = _RaisingCollector()
    daemon.registry.register(broken)  # e.g. a component collector registered in the live registry
    status, text = await scrape(daemon)
    assert status == 200
    assert metric(text, "virtwatch_collector_success", collector="daemon") == 0
    assert metric(text, "virtwatch_collector_success", collector="agent") == 1
    assert metric(text, "virtwatch_collector_success", collector="state") == 1
    assert metric(text, "libvirt_domain_state_code", domain=name) == 1  # the state families are still there
    assert metric(text, "libvirt_up") is None  # the broken unit's own families are left out
    daemon.registry.unregister(broken)
    status, text = await scrape(daemon)
    assert status == 200
    assert metric(text, "virtwatch_collector_success", collector="daemon") == 1
    assert metric(text, "libvirt_up") == 1


async def test_reconnect_reregisters_callbacks_and_resyncs(daemon: Daemon, make_guests) -> None:
    (dom,) = await asyncio.to_thread(make_guests, "recon", 1, True)
    name = dom.name()
    await until(lambda: daemon.guests.by_name(name) is not None)
    before = daemon.registry.get_sample_value("libvirt_connection_reconnects_total")
    await daemon.connection.reconnect()
    await until(lambda: not daemon.connection.ready.is_set(), 2)
    await asyncio.to_thread(dom.suspend)  # happens while disconnected: only a resync can tell
    await asyncio.wait_for(daemon.connection.ready.wait(), 10)
    assert daemon.registry.get_sample_value("libvirt_connection_reconnects_total") == before + 1
    assert daemon.guests.by_name(name).state == libvirt.VIR_DOMAIN_PAUSED
    counted = daemon.pump.published
    await asyncio.to_thread(dom.resume)  # exactly one event: callbacks registered once, not twice
    await until(lambda: daemon.guests.by_name(name).state == libvirt.VIR_DOMAIN_RUNNING)
    await daemon.pump.wait_idle()
    await asyncio.sleep(0.1)
    assert daemon.pump.published == counted + 1


async def test_agent_calls_have_their_own_connection_that_follows_reconnects(daemon: Daemon) -> None:
    # one calling thread per connection (libvirt 9.0's client): the agent's slow calls use a second one
    side = daemon.agent_side
    await until(lambda: side.conn is not None)
    main = daemon.connection.conn
    assert side.conn is not main and side.opens == 1
    old = side.conn
    await daemon.connection.reconnect()
    await until(lambda: side.conn is None, 2)      # dropped with the main connection
    await asyncio.wait_for(daemon.connection.ready.wait(), 10)
    await until(lambda: side.conn is not None)
    assert side.opens == 2 and side.conn is not old and side.conn is not daemon.connection.conn
    assert old._o is None  # the old side connection was closed (libvirt-python clears _o on close)


async def test_storm_of_10000_events_over_100_guests_loses_none(daemon: Daemon, make_guests) -> None:
    doms = await asyncio.to_thread(make_guests, "storm", 100)
    await until(lambda: sum(1 for g in daemon.guests.guests() if g.name.startswith("storm-")) == 100, 10)
    await daemon.pump.wait_idle()

    def count(event: str, detail: str) -> float:
        return daemon.registry.get_sample_value(
            "libvirt_events_total", {"kind": "lifecycle", "event": event, "detail": detail}) or 0.0

    paused_before, resumed_before = count("SUSPENDED", "PAUSED"), count("RESUMED", "UNPAUSED")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def storm() -> int:
        n = 0
        for _ in range(50):
            for d in doms:
                d.suspend()
                d.resume()
                n += 2
        return n

    generated = await asyncio.to_thread(storm)
    assert generated == 10_000

    def total() -> float:
        return count("SUSPENDED", "PAUSED") - paused_before + count("RESUMED", "UNPAUSED") - resumed_before

    await until(lambda: total() >= generated, 30)
    await daemon.pump.wait_idle()
    assert total() == generated
    assert all(g.state == libvirt.VIR_DOMAIN_RUNNING for g in daemon.guests.guests() if g.name.startswith("storm-"))
    assert daemon.pump.backlog == 0
    assert len(daemon.recent.since(0, limit=0)) <= 2000  # ring buffer stays bounded
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB during the storm"


async def test_each_poll_is_rendered_before_any_scrape_asks(event_impl, make_guests) -> None:
    """The state text is rendered after each poll, off the loop: a scrape that follows
    finds it finished and renders nothing itself. (Polls every 5 s: the scrape comes
    well before the next one.)"""
    (dom,) = await asyncio.to_thread(make_guests, "prerender", 1)
    d = Daemon(load_settings(None, {"libvirt.uri": "test:///default", "http.listen": "127.0.0.1:0",
                                    "stats.poll_interval": 5.0, "log.events": False}), event_impl)
    await d.start()
    try:
        await until(lambda: d.poller.latest is not None
                    and any(s.name == dom.name() for s in d.poller.latest.domains.values()), 10, "polled")
        await until(lambda: d.exposition.cached_key is not None
                    and d.exposition.cached_key == d.exposition.current_key(), 5, "rendered without a scrape")
        renders = d.exposition.renders
        status, text = await scrape(d)
        assert status == 200 and f'domain="{dom.name()}"' in text
        assert d.exposition.renders == renders  # the scrape rendered nothing
    finally:
        await d.stop()
