"""Instant alerts against real Alertmanager processes (v2 API), no fakes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client import CollectorRegistry

from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.config import AlertSettings
from virtwatch.model import Event


def alerter(urls: list[str], **kw) -> tuple[Alerter, CollectorRegistry]:
    reg = CollectorRegistry()
    s = AlertSettings(alertmanager_urls=urls, instance="hv-test", min_firing_duration=0.0, retry_min_delay=0.05,
                      retry_max_delay=0.2, generator_url="http://hv-test:9177/", **kw)
    return Alerter(s, reg), reg


def event(name: str, kind: str, ev: str, detail: str, seq: int = 1, payload=None) -> Event:
    return Event(time=time.time(), seq=seq, source="domain", kind=kind, name=name, uuid=f"uuid-{name}", event=ev,
                 detail=detail, payload=payload or {})


async def am_alerts(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.get(url + "/api/v2/alerts") as r:
        assert r.status == 200
        return await r.json()


async def wait_for(url: str, pred, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        alerts = await am_alerts(url)
        if pred(alerts):
            return alerts
        assert time.monotonic() < deadline, f"condition not met on {url}: {alerts}"
        await asyncio.sleep(0.02)


def named(alerts: list[dict], alertname: str, domain: str | None) -> list[dict]:
    return [a for a in alerts if a["labels"].get("alertname") == alertname and a["labels"].get("domain") == domain]


async def test_fired_alert_arrives_with_labels_and_annotations_then_resolves(alertmanagers):
    am = alertmanagers[0]
    al, reg = alerter([am.url])
    await al.start()
    try:
        t0 = time.monotonic()
        al.on_event(event("web1", "io_error", "IO_ERROR", "enospc",
                          payload={"src": "/var/lib/libvirt/images/web1.qcow2", "dev": "virtio-disk0",
                                   "action": "PAUSE"}), decision="leave paused (policy io_error=leave)")
        alerts = await wait_for(am.url, lambda a: named(a, "VirtwatchGuestIOError", "web1"))
        latency = time.monotonic() - t0
        [a] = named(alerts, "VirtwatchGuestIOError", "web1")
        assert a["labels"] == {"alertname": "VirtwatchGuestIOError", "severity": "critical", "domain": "web1",
                               "uuid": "uuid-web1", "instance": "hv-test"}
        ann = a["annotations"]
        assert ann["summary"] == "Guest web1 hit a disk I/O error on hv-test"
        assert (ann["device"], ann["source"], ann["reason"]) == ("virtio-disk0", "/var/lib/libvirt/images/web1.qcow2",
                                                                 "enospc")
        assert ann["decision"] == "leave paused (policy io_error=leave)"
        assert "device virtio-disk0" in ann["description"]
        assert a["generatorURL"] == "http://hv-test:9177/"
        assert a["status"]["state"] in ("active", "unprocessed")
        assert latency < 1.0
        assert reg.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) == 1

        al.on_event(event("web1", "lifecycle", "RESUMED", "UNPAUSED", seq=2))
        await wait_for(am.url, lambda a: not named(a, "VirtwatchGuestIOError", "web1"))
        # Still known to Alertmanager as resolved (GET with no filter lists only unexpired alerts).
        assert al.active == {}
    finally:
        await al.stop(2.0)


async def test_outage_alerts_queue_and_arrive_after_restart(alertmanagers):
    am = alertmanagers[0]
    am.stop()
    al, reg = alerter([am.url])
    await al.start()
    try:
        al.on_event(event("db1", "lifecycle", "STOPPED", "FAILED"))
        al.connection_lost("qemu:///system", "keepalive timeout")
        deadline = time.monotonic() + 5
        while (reg.get_sample_value("virtwatch_alerts_failed_total", {"alertmanager": am.url}) or 0) < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert reg.get_sample_value("virtwatch_alerts_queue_length", {"alertmanager": am.url}) == 2
        assert reg.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) == 0
        am.start()
        alerts = await wait_for(am.url, lambda a: named(a, "VirtwatchQemuFailed", "db1")
                                and [x for x in a if x["labels"]["alertname"] == "VirtwatchLibvirtConnectionLost"])
        [lost] = [x for x in alerts if x["labels"]["alertname"] == "VirtwatchLibvirtConnectionLost"]
        assert lost["labels"] == {"alertname": "VirtwatchLibvirtConnectionLost", "severity": "critical",
                                  "instance": "hv-test"}
        assert reg.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) == 2
        assert reg.get_sample_value("virtwatch_alerts_queue_length", {"alertmanager": am.url}) == 0
        assert reg.get_sample_value("virtwatch_alerts_dropped_total",
                                    {"alertmanager": am.url, "reason": "queue_full"}) is None
        al.connection_restored()
        await wait_for(am.url, lambda a: not [x for x in a
                                              if x["labels"]["alertname"] == "VirtwatchLibvirtConnectionLost"])
    finally:
        await al.stop(2.0)


async def test_two_alertmanagers_both_receive_even_if_one_was_down(alertmanagers):
    am1, am2 = alertmanagers
    am2.stop()
    al, reg = alerter([am1.url, am2.url])
    await al.start()
    try:
        al.on_event(event("app1", "lifecycle", "CRASHED", "PANICKED"))
        await wait_for(am1.url, lambda a: named(a, "VirtwatchGuestCrashed", "app1"))
        am2.start()
        alerts = await wait_for(am2.url, lambda a: named(a, "VirtwatchGuestCrashed", "app1"))
        assert named(alerts, "VirtwatchGuestCrashed", "app1")[0]["labels"]["instance"] == "hv-test"
        for am in (am1, am2):
            assert reg.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) == 1
        assert reg.get_sample_value("virtwatch_alerts_failed_total", {"alertmanager": am1.url}) == 0
        assert reg.get_sample_value("virtwatch_alerts_failed_total", {"alertmanager": am2.url}) >= 1
    finally:
        await al.stop(2.0)


async def test_resend_keeps_alert_alive_past_its_endsat(alertmanagers):
    am = alertmanagers[0]
    # endsAt = now + 4 x 0.25 s: without re-posts Alertmanager would expire it after 1 s.
    al, reg = alerter([am.url], resend_interval=0.25)
    await al.start()
    try:
        al.fire("VirtwatchGivenUp", "web9", "uuid-web9", "critical", "gave up", "budget exhausted")
        await wait_for(am.url, lambda a: named(a, "VirtwatchGivenUp", "web9"))
        await asyncio.sleep(1.6)
        assert named(await am_alerts(am.url), "VirtwatchGivenUp", "web9")
        assert reg.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": am.url}) >= 5
    finally:
        await al.stop(0)
    # Daemon gone: no more re-posts, the alert expires by itself.
    await wait_for(am.url, lambda a: not named(a, "VirtwatchGivenUp", "web9"), timeout=5)


async def test_alertmanager_keeps_the_guest_link_and_runbook_of_an_odd_name(alertmanagers):
    am = alertmanagers[0]
    reg = CollectorRegistry()
    s = AlertSettings(alertmanager_urls=[am.url], instance="hv-test", min_firing_duration=0.0,
                      retry_min_delay=0.05, retry_max_delay=0.2, external_url="http://hv-test.example.org:9177",
                      runbook_base_url="https://wiki.example.org/virtwatch/runbooks")
    al = Alerter(s, reg)
    await al.start()
    try:
        al.on_event(event("odd name/ü", "lifecycle", "CRASHED", "PANICKED"))
        al.connection_lost("qemu:///system", "keepalive timeout")
        alerts = await wait_for(am.url, lambda a: named(a, "VirtwatchGuestCrashed", "odd name/ü")
                                and named(a, "VirtwatchLibvirtConnectionLost", None))  # host alert: no domain
        [crashed] = named(alerts, "VirtwatchGuestCrashed", "odd name/ü")
        assert crashed["generatorURL"] == "http://hv-test.example.org:9177/api/v1/guests/odd%20name%2F%C3%BC"
        assert crashed["annotations"]["runbook_url"] == \
            "https://wiki.example.org/virtwatch/runbooks/VirtwatchGuestCrashed.md"
        [lost] = named(alerts, "VirtwatchLibvirtConnectionLost", None)
        assert lost["generatorURL"] == "http://hv-test.example.org:9177/"
        assert lost["annotations"]["runbook_url"] == \
            "https://wiki.example.org/virtwatch/runbooks/VirtwatchLibvirtConnectionLost.md"
    finally:
        await al.stop(2.0)
