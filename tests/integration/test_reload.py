"""A reload (SIGHUP) keeps what the new configuration does not change.

The daemon runs in this process on the test driver with policy enabled; instant alerts go
to real Alertmanagers. :func:`virtwatch.app.reload` is what the CLI's SIGHUP handler runs.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import libvirt

from testkit import sample as metric, scrape, until, until_sync
from virtwatch.app import Daemon, reload
from virtwatch.config import Settings, load_settings, settings_from_mapping
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl


def settings(tmp_path: Path, am_url: str, poll: float, listen: str = "127.0.0.1:0") -> Settings:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    return settings_from_mapping({
        "libvirt": {"uri": "test:///default"},
        "http": {"listen": listen},
        "stats": {"poll_interval": poll},
        "log": {"events": False},
        "alerts": {"alertmanager_urls": [am_url], "instance": "hv-reload", "min_firing_duration": 0.0,
                   "resend_interval": 3600.0},
        "daemon": {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "vw.sock"),
                   "boot_id_file": str(boot_id)},
        "policy": {"enabled": True, "debounce": 0.05, "boot_settle_quiet": 0.1, "boot_settle_timeout": 1.0,
                   "match": [{"glob": "rl-*", "on_destroy": "restart", "restart_delay": 0.1}]},
    })


def counters(text: str, name: str) -> dict[str, float]:
    """Every sample of one family, by its label text."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{")}


async def test_reload_keeps_guests_events_counters_snapshots_and_firing_alerts(
        event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path, make_guests: Any, actor: libvirt.virConnect,
        alertmanagers: Any) -> None:
    am0, am1 = alertmanagers
    d = Daemon(settings(tmp_path, am0.url, 0.5), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "rl", 1, True)
        name = dom.name()
        await until(lambda: name in d.policy.engine.snapshot().guests, 10, "policy knows the guest")
        await until(lambda: d.policy_side.conn is not None, 10, "policy connection open")
        await asyncio.to_thread(dom.destroy)  # on_destroy = restart: the policy starts it again
        await until(lambda: d.policy.engine.snapshot().actions.get(("start", "ok"), 0) == 1, 20, "restarted")
        await until(lambda: d.guests.by_name(name).state == libvirt.VIR_DOMAIN_RUNNING, 10, "running again")
        d.alerter.given_up(name, dom.UUIDString(), "5 crashes in 10m")  # as the policy does
        await until(lambda: am0.alerts(alertname="VirtwatchGivenUp", domain=name), 10, "alert at am0")
        await until(lambda: d.poller.latest is not None and any(
            s.name == name for s in d.poller.latest.domains.values()), 10, "guest polled")
        _, before = await scrape(d)
        events_before = counters(before, "libvirt_events_total")
        seqs_before = [e.seq for e in d.recent.since(0, limit=1000)]
        snap_before = d.poller.latest
        assert metric(before, "virtwatch_policy_actions_total", action="start", result="ok") == 1
        assert events_before and seqs_before

        d = await reload(d, settings(tmp_path, am1.url, 0.7))

        assert d.settings.stats.poll_interval == 0.7  # the new configuration is in force
        # At once, before libvirt is even connected again: the state is the old daemon's.
        assert d.guests.by_name(name) is not None and d.guests.by_name(name).state == libvirt.VIR_DOMAIN_RUNNING
        assert [e.seq for e in d.recent.since(0, limit=1000)] == seqs_before
        assert d.poller.latest is snap_before
        _, after = await scrape(d)
        assert counters(after, "libvirt_events_total") == events_before  # counters go on, never reset
        assert metric(after, "virtwatch_policy_actions_total", action="start", result="ok") == 1
        assert metric(after, "libvirt_domain_state_code", domain=name) == libvirt.VIR_DOMAIN_RUNNING
        assert metric(after, "virtwatch_alerts_sent_total", alertmanager=am0.url) >= 1
        # The firing give-up is posted to the new Alertmanager at once, not at the next resend.
        await until(lambda: am1.alerts(alertname="VirtwatchGivenUp", domain=name), 10, "alert at am1")
        assert ("VirtwatchGivenUp", name) in d.alerter.active

        # Events go on with the same numbering; the counters grow from where they were.
        await d.connection.ready.wait()
        await asyncio.to_thread(dom.suspend)
        await until(lambda: d.guests.by_name(name).state == libvirt.VIR_DOMAIN_PAUSED, 10, "paused")
        newest = d.recent.since(seqs_before[-1], limit=1000)
        assert [(e.event, e.detail) for e in newest if e.name == name][-1] == ("SUSPENDED", "PAUSED")
        assert newest[0].seq > seqs_before[-1]
        _, later = await scrape(d)
        key = 'libvirt_events_total{detail="PAUSED",event="SUSPENDED",kind="lifecycle"}'
        assert counters(later, "libvirt_events_total")[key] == events_before.get(key, 0) + 1
    finally:
        await d.stop()


async def test_a_reload_that_cannot_start_keeps_the_old_configuration_and_the_state(
        event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path, make_guests: Any, alertmanagers: Any) -> None:
    am0 = alertmanagers[0]
    d = Daemon(settings(tmp_path, am0.url, 0.5), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "rlf", 1)
        await until(lambda: d.guests.by_name(dom.name()) is not None, 10, "guest seen")
        seqs = [e.seq for e in d.recent.since(0, limit=1000)]
        with socket.socket() as taken:  # the new listen address is in use: the new daemon cannot start
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            d = await reload(d, settings(tmp_path, am0.url, 0.5, listen=f"127.0.0.1:{port}"))
        assert d.settings.http.listen == "127.0.0.1:0"  # the previous configuration runs again
        assert d.listen_address is not None and d.listen_address[1] != port
        assert d.guests.by_name(dom.name()) is not None
        assert [e.seq for e in d.recent.since(0, limit=1000)] == seqs
        assert (await scrape(d, "/healthz"))[0] == 200
    finally:
        await d.stop()


async def test_a_crash_while_no_connection_is_open_still_pages(
        event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path, make_guests: Any, actor: libvirt.virConnect,
        alertmanagers: Any) -> None:
    """A reload closes the libvirt connection for a moment (so does a libvirtd restart). A guest
    that crashes then sends its event to nobody; the resync on reconnect finds it crashed and
    hands the alert rules the event it stands for."""
    am = alertmanagers[0]
    mapping = {"libvirt.uri": "test:///default", "http.listen": "127.0.0.1:0", "stats.poll_interval": 0.5,
               "log.events": False, "alerts.alertmanager_urls": [am.url], "alerts.min_firing_duration": 0.0,
               "alerts.instance": "hv-gap"}
    d = Daemon(load_settings(None, mapping), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "gap", 1, True)
        name = dom.name()
        await until(lambda: d.guests.by_name(name) is not None
                    and d.guests.by_name(name).state == libvirt.VIR_DOMAIN_RUNNING, 10, "seen running")
        await d.stop()  # what reload() does first: no connection is open from here
        kept = d.handover()
        await asyncio.to_thread(dom.coreDump, str(tmp_path / "core"), libvirt.VIR_DUMP_CRASH)  # STOPPED/CRASHED
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
        d = Daemon(load_settings(None, mapping), event_impl, retained=kept)
        await d.start()
        await d.connection.ready.wait()
        assert d.guests.by_name(name).reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
        assert all(e.name != name or e.event != "STOPPED" for e in d.recent.since(0))  # no event came
        alerts = await asyncio.to_thread(
            lambda: until_sync(lambda: am.alerts(alertname="VirtwatchGuestCrashed", domain=name), 10))
        assert alerts[0]["labels"]["instance"] == "hv-gap"
        _, text = await scrape(d)
        assert metric(text, "virtwatch_events_missed_total", event="STOPPED", detail="CRASHED") == 1
    finally:
        await d.stop()

