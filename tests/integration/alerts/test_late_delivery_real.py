"""Late delivery, the spool and one page per incident against a real Alertmanager (issue 10).

Alertmanager runs the shipped ``config/alertmanager/alertmanager.example.yml`` (routing and
inhibit rules) with its receivers pointed at a webhook this test runs on 127.0.0.1, timings
shortened and ``send_resolved: false`` (every notification is a page). No fakes: real
Alertmanager processes, real HTTP, real files.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from hostlib.promstack import AlertmanagerProcess, WebhookReceiver
from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.client import rfc3339
from virtwatch.alerts.config import AlertSettings
from virtwatch.model import Event

SHIPPED_AM = Path(__file__).resolve().parents[3] / "config" / "alertmanager" / "alertmanager.example.yml"
INSTANCE = "hv-test:9177"


def am_config(webhook: str) -> str:
    cfg = yaml.safe_load(SHIPPED_AM.read_text())
    for r in cfg["receivers"]:
        r["webhook_configs"] = [{"url": f"{webhook}/{r['name']}", "send_resolved": False}]
    cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for sub in cfg["route"]["routes"]:
        sub.update(group_wait="1s", repeat_interval="1h")
    return yaml.safe_dump(cfg)


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def am(tmp_path: Path, hook: WebhookReceiver) -> Iterator[AlertmanagerProcess]:
    p = AlertmanagerProcess(tmp_path / "am", am_config(hook.url))
    p.start()
    yield p
    p.stop()


def alerter(url: str, spool: Path | None = None, **kw) -> tuple[Alerter, CollectorRegistry]:
    reg = CollectorRegistry()
    s = AlertSettings(alertmanager_urls=[url], instance=INSTANCE, retry_min_delay=0.05, retry_max_delay=0.2, **kw)
    return Alerter(s, reg, state_dir=spool.parent if spool is not None else None), reg


def event(name: str, ev: str, detail: str, t: float, seq: int) -> Event:
    return Event(time=t, seq=seq, source="domain", kind="lifecycle", name=name, uuid=f"uuid-{name}", event=ev,
                 detail=detail, payload={})


def pages(hook: WebhookReceiver, domain: str) -> list[dict]:
    return [b for _, _, b in hook.notifications() if any(a["labels"].get("domain") == domain for a in b["alerts"])]


async def until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def post(am: AlertmanagerProcess, alerts: list[dict]) -> None:
    """What Prometheus does: POST /api/v2/alerts."""
    req = urllib.request.Request(am.url + "/api/v2/alerts", json.dumps(alerts).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def ts(s: str) -> float:
    head, _, frac = s.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


async def test_a_crash_healed_during_an_outage_is_paged_once_after_it(am, hook):
    am.stop()
    # min_firing_duration 0: without the hold its endsAt would be t0 + 1 s, long past at delivery.
    al, reg = alerter(am.url, late_resolved_hold=6.0, min_firing_duration=0.0)
    await al.start()
    try:
        t0 = time.time()
        al.on_event(event("web1", "STOPPED", "FAILED", t0, 1))
        al.on_event(event("web1", "STARTED", "BOOTED", t0 + 1.0, 2))  # healed before delivery
        await until(lambda: (reg.get_sample_value("virtwatch_alerts_failed_total", {"alertmanager": am.url}) or 0)
                    >= 2, 5, "POSTs failing while Alertmanager is down")
        am.start()
        delivered_at = time.time()
        [alert] = await until(lambda: am.alerts(alertname="VirtwatchQemuFailed", domain="web1"), 10,
                              "late alert listed as active")
        assert ts(alert["startsAt"]) == pytest.approx(t0, abs=0.002)  # the incident's own start
        assert delivered_at + 5.0 < ts(alert["endsAt"]) < time.time() + 6.0  # ahead of delivery by the hold
        assert alert["annotations"]["resolved_at"] == rfc3339(t0 + 1.0)
        [page] = await until(lambda: pages(hook, "web1"), 10, "page for the healed crash")
        assert page["receiver"] == "page" and page["alerts"][0]["labels"]["alertname"] == "VirtwatchQemuFailed"
        await until(lambda: not am.alerts(alertname="VirtwatchQemuFailed"), 15, "expired after the hold")
        await asyncio.sleep(3.0)  # group_interval 1 s: a second page would be here by now
        assert len(pages(hook, "web1")) == 1
    finally:
        await al.stop(1.0)


async def test_alerts_spooled_through_a_daemon_restart_are_paged_once(am, hook, tmp_path):
    spool = tmp_path / "state" / "alerts-spool.json"
    am.stop()
    al, _ = alerter(am.url, spool, late_resolved_hold=4.0)
    await al.start()
    t0 = time.time()
    al.on_event(event("db1", "CRASHED", "PANICKED", t0, 1))
    al.on_event(event("db1", "STARTED", "BOOTED", t0 + 0.5, 2))
    al.on_event(event("db2", "CRASHED", "PANICKED", t0 + 0.2, 3))  # still crashed at the restart
    await asyncio.sleep(0.5)
    await al.stop(0.2)  # Alertmanager still down: the queue goes to the spool
    on_disk = json.loads(spool.read_text())["alertmanagers"][am.url]
    assert sorted((a["labels"]["domain"], a["ends_at"] is None) for a in on_disk) == [("db1", False), ("db2", True)]

    am.start()
    al2, reg2 = alerter(am.url, spool, late_resolved_hold=4.0)
    await al2.start()  # the next daemon
    try:
        await until(lambda: pages(hook, "db1") and pages(hook, "db2"), 10, "both incidents paged")
        crashed = {a["labels"]["domain"]: a for a in am.alerts(alertname="VirtwatchGuestCrashed")}
        assert ts(crashed["db1"]["startsAt"]) == pytest.approx(t0, abs=0.002)
        assert ts(crashed["db2"]["startsAt"]) == pytest.approx(t0 + 0.2, abs=0.002)
        assert reg2.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) == 2
        assert json.loads(spool.read_text())["alertmanagers"] == {}
        await asyncio.sleep(3.0)
        assert (len(pages(hook, "db1")), len(pages(hook, "db2"))) == (1, 1)
    finally:
        await al2.stop(1.0)


async def test_a_corrupt_spool_is_moved_aside_and_the_daemon_delivers(am, hook, tmp_path):
    spool = tmp_path / "state" / "alerts-spool.json"
    spool.parent.mkdir()
    spool.write_text('{"version": 1, "alertmanagers": {"' + am.url + '": [{"labels": ')  # cut off mid-write
    al, _ = alerter(am.url, spool)
    await al.start()
    try:
        al.on_event(event("app1", "CRASHED", "PANICKED", time.time(), 1))
        await until(lambda: pages(hook, "app1"), 10, "page despite the corrupt spool")
        assert [p.name.split("-")[0] for p in spool.parent.glob("alerts-spool.json.corrupt-*")] == ["alerts"]
    finally:
        await al.stop(1.0)


async def test_instant_alert_and_its_rule_twin_are_one_alert_and_inhibit_the_rest(am, hook):
    al, _ = alerter(am.url)
    await al.start()
    try:
        t0 = time.time()
        al.on_event(event("web7", "CRASHED", "PANICKED", t0, 1))
        await until(lambda: pages(hook, "web7"), 10, "instant page")
        # Prometheus' side, as the shipped rules label it: the twin (no job) and the restart notice.
        now = time.time()
        ends = rfc3339(now + 60)
        post(am, [
            {"labels": {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "instance": INSTANCE,
                        "domain": "web7", "uuid": "uuid-web7"}, "annotations": {"summary": "rule"},
             "startsAt": rfc3339(now - 1), "endsAt": ends},
            {"labels": {"alertname": "LibvirtGuestRestarted", "severity": "warning", "instance": INSTANCE,
                        "job": "virtwatch", "domain": "web7", "reason": "crash"},
             "annotations": {"summary": "restarted"}, "startsAt": rfc3339(now - 1), "endsAt": ends},
            {"labels": {"alertname": "LibvirtGuestCrashEvents", "severity": "critical", "instance": INSTANCE,
                        "job": "virtwatch"}, "annotations": {"summary": "events"},
             "startsAt": rfc3339(now - 1), "endsAt": ends},
        ])
        al.on_event(event("web7", "STARTED", "BOOTED", time.time(), 2))  # the instant side resolves
        [one] = am.alerts(alertname="VirtwatchGuestCrashed", domain="web7")
        assert ts(one["startsAt"]) == pytest.approx(t0, abs=0.002)  # merged: the earliest start
        restarted = am.alerts(alertname="LibvirtGuestRestarted", domain="web7")
        events = am.alerts(alertname="LibvirtGuestCrashEvents")
        assert restarted[0]["status"]["state"] == events[0]["status"]["state"] == "suppressed"
        assert restarted[0]["status"]["inhibitedBy"] and events[0]["status"]["inhibitedBy"]
        await asyncio.sleep(3.0)  # the instant resolve (endsAt ahead of sending) keeps it one alert
        [still] = am.alerts(alertname="VirtwatchGuestCrashed", domain="web7")
        assert still["status"]["state"] == "active"
        assert len(pages(hook, "web7")) == 1
        assert not [b for _, _, b in hook.notifications()
                    if b["alerts"][0]["labels"]["alertname"] in ("LibvirtGuestRestarted", "LibvirtGuestCrashEvents")]
    finally:
        await al.stop(1.0)
