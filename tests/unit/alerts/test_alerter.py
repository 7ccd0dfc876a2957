"""The Alerter facade: events in, alert states out, resend, annotations."""

from __future__ import annotations

import socket

import pydantic
import pytest
from prometheus_client import CollectorRegistry

from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.client import rfc3339
from virtwatch.alerts.config import AlertSettings
from virtwatch.model import Event

A = "http://am:9093"
EP = A + "/api/v2/alerts"


def settings(**kw) -> AlertSettings:
    base = dict(alertmanager_urls=[A], instance="hv1", resend_interval=30.0, min_firing_duration=0.0)
    base.update(kw)
    return AlertSettings(**base)


def make(clock, session, **kw) -> Alerter:
    return Alerter(settings(**kw), CollectorRegistry(), clock=clock, sleep=clock.sleep,
                   session_factory=lambda: session, jitter=lambda: 0.5)


def ev(t: float, seq: int, kind: str, event: str, detail: str, name: str = "web1", payload=None) -> Event:
    return Event(time=t, seq=seq, source="domain", kind=kind, name=name, uuid="u-1", event=event, detail=detail,
                 payload=payload or {})


async def test_crash_then_restart_posts_fire_then_resolve(clock, session, fakes):
    al = make(clock, session)
    await al.start()
    t0 = clock.t
    al.on_event(ev(t0, 1, "lifecycle", "CRASHED", "PANICKED"), decision="restart in 5s, attempt 1/5")
    await fakes.settle()
    [fired] = session.delivered()
    assert fired["labels"] == {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "domain": "web1",
                               "uuid": "u-1", "instance": "hv1"}
    assert fired["annotations"]["summary"] == "Guest web1 crashed on hv1"
    assert fired["annotations"]["decision"] == "restart in 5s, attempt 1/5"
    assert "lifecycle CRASHED/PANICKED" in fired["annotations"]["description"]
    assert fired["startsAt"] == rfc3339(t0)
    assert fired["endsAt"] == rfc3339(clock.t + 120.0)
    # STOPPED/CRASHED follows: same alert, same startsAt, updated description, annotations kept.
    al.on_event(ev(t0 + 0.05, 2, "lifecycle", "STOPPED", "CRASHED"))
    await fakes.settle()
    second = session.delivered()[1]
    assert second["startsAt"] == rfc3339(t0)
    assert "STOPPED/CRASHED" in second["annotations"]["description"]
    assert second["annotations"]["decision"] == "restart in 5s, attempt 1/5"
    # Restarted: RESUMED/UNPAUSED arrives first and resolves it.
    await clock.advance(5.0)
    acts = al.on_event(ev(clock.t, 3, "lifecycle", "RESUMED", "UNPAUSED"))
    assert [(a.op, a.alertname) for a in acts] == [("resolve", "VirtwatchGuestCrashed")]
    assert al.on_event(ev(clock.t, 4, "lifecycle", "STARTED", "BOOTED")) == []
    await fakes.settle()
    resolved = session.delivered()[2]
    # endsAt: the resolve time, but RESOLVE_GRACE (5 s) ahead of the send at least, so that it
    # never ends a rule twin's alert Alertmanager merged it with.
    assert (resolved["startsAt"], resolved["endsAt"]) == (rfc3339(t0), rfc3339(clock.t + 5.0))
    assert al.active == {}
    await al.stop(0)


async def test_resolve_holds_alert_for_min_firing_duration(clock, session, fakes):
    al = make(clock, session, min_firing_duration=60.0)
    await al.start()
    t0 = clock.t
    al.on_event(ev(t0, 1, "lifecycle", "STOPPED", "FAILED"))
    await fakes.settle()
    al.on_event(ev(t0 + 2, 2, "lifecycle", "STARTED", "BOOTED"))
    await fakes.settle()
    fired, resolved = session.delivered()
    assert fired["labels"] == resolved["labels"] and fired["labels"]["alertname"] == "VirtwatchQemuFailed"
    assert resolved["endsAt"] == rfc3339(t0 + 60.0)
    assert "resolved_at" not in resolved["annotations"]  # accepted firing before: an ordinary resolve
    await al.stop(0)


async def test_resolve_of_an_alert_never_delivered_is_held_from_delivery(clock, session, fakes):
    # Fire and resolve coalesce while nothing was sent: Alertmanager never saw the incident,
    # so it gets it active until late_resolved_hold after delivery, not already expired.
    al = make(clock, session, min_firing_duration=60.0, late_resolved_hold=200.0)
    await al.start()
    t0 = clock.t
    al.on_event(ev(t0, 1, "lifecycle", "STOPPED", "FAILED"))
    al.on_event(ev(t0 + 2, 2, "lifecycle", "STARTED", "BOOTED"))
    await fakes.settle()
    [only] = session.delivered()
    assert (only["startsAt"], only["endsAt"]) == (rfc3339(t0), rfc3339(clock.t + 200.0))
    assert only["annotations"]["resolved_at"] == rfc3339(t0 + 2)
    await al.stop(0)


async def test_io_error_then_suspended_keeps_device_detail(clock, session, fakes):
    al = make(clock, session)
    await al.start()
    al.on_event(ev(clock.t, 1, "io_error", "IO_ERROR", "enospc", name="ioerr",
                   payload={"src": "/var/lib/libvirt/images/small/io.qcow2", "dev": "virtio-disk0", "action": 1}))
    assert al.on_event(ev(clock.t, 2, "lifecycle", "SUSPENDED", "IOERROR", name="ioerr")) == []
    await fakes.settle()
    [a] = session.delivered()
    assert a["labels"]["alertname"] == "VirtwatchGuestIOError"
    assert (a["annotations"]["device"], a["annotations"]["reason"]) == ("virtio-disk0", "enospc")
    await al.stop(0)


async def test_firing_alerts_are_reposted_every_resend_interval(clock, session, fakes):
    al = make(clock, session)
    await al.start()
    al.fire("VirtwatchGivenUp", "web1", "u-1", "critical", "gave up", "budget exhausted")
    al.fire("VirtwatchRestoreFailed", "db1", "u-2", "critical", "restore failed", "bad image")
    al.resolve("VirtwatchRestoreFailed", "db1")
    await fakes.settle()
    assert len(session.delivered()) == 2
    await clock.advance(30.0)
    reposted = session.delivered()[2:]
    assert [(a["labels"]["alertname"], a["endsAt"]) for a in reposted] == [
        ("VirtwatchGivenUp", rfc3339(clock.t + 120.0))]
    await clock.advance(30.0)
    assert len(session.delivered()) == 4
    await al.stop(0)


async def test_annotate_adds_console_to_active_alert(clock, session, fakes):
    al = make(clock, session)
    await al.start()
    al.on_event(ev(clock.t, 1, "lifecycle", "CRASHED", "PANICKED"))
    assert al.annotate("VirtwatchGuestCrashed", "web1", console="Kernel panic - not syncing: sysrq")
    assert not al.annotate("VirtwatchGuestCrashed", "other", console="x")
    await fakes.settle()
    last = session.delivered()[-1]
    assert last["annotations"]["console"] == "Kernel panic - not syncing: sysrq"
    assert last["annotations"]["summary"] == "Guest web1 crashed on hv1"
    await al.stop(0)


async def test_connection_lost_and_restored(clock, session, fakes):
    al = make(clock, session)
    await al.start()
    al.connection_lost("qemu:///system", "keepalive timeout")
    await fakes.settle()
    await clock.advance(3.0)
    al.connection_restored()
    await fakes.settle()
    lost, back = session.delivered()
    assert lost["labels"] == {"alertname": "VirtwatchLibvirtConnectionLost", "severity": "critical",
                              "instance": "hv1"}
    assert lost["annotations"]["uri"] == "qemu:///system"
    assert back["endsAt"] == rfc3339(clock.t)  # no rule twin: ends at once
    await al.stop(0)


async def test_given_up_and_restore_failed_helpers(clock, session, fakes):
    al = make(clock, session)
    al.given_up("web1", "u-1", "5 crashes in 10m", decision="give up")
    al.restore_failed("web2", "u-2", "cannot read image")
    assert sorted(al.active) == [("VirtwatchGivenUp", "web1"), ("VirtwatchRestoreFailed", "web2")]
    # Running again clears the restore failure, never the give-up.
    al.on_event(ev(clock.t, 1, "lifecycle", "STARTED", "BOOTED", name="web1"))
    al.on_event(ev(clock.t, 2, "lifecycle", "STARTED", "BOOTED", name="web2"))
    assert sorted(al.active) == [("VirtwatchGivenUp", "web1")]
    await al.start()
    await fakes.settle()
    assert [a["labels"]["alertname"] for a in session.delivered()] == ["VirtwatchGivenUp", "VirtwatchRestoreFailed"]
    await al.stop(0)


async def test_disabled_alerter_tracks_but_never_posts(clock, session, fakes):
    al = make(clock, session, alertmanager_urls=[])
    await al.start()
    al.on_event(ev(clock.t, 1, "lifecycle", "CRASHED", "PANICKED"))
    assert list(al.active) == [("VirtwatchGuestCrashed", "web1")]
    await clock.advance(60.0)
    await al.stop(1.0)
    assert session.requests == []


def test_settings_defaults_and_validation():
    s = AlertSettings()
    assert s.alertmanager_urls == () and not s.enabled and s.instance is None
    assert (s.late_resolved_hold, s.min_firing_duration) == (330.0, 60.0)
    assert AlertSettings(alertmanager_urls=["http://a:9093", "http://a:9093"]).alertmanager_urls == ("http://a:9093",)
    for bad in [dict(alertmanager_urls=["am:9093"]), dict(unknown=1), dict(retry_min_delay=10, retry_max_delay=1),
                dict(basic_auth_username="u"), dict(queue_size=0), dict(timeout=0),
                dict(basic_auth_username="u", basic_auth_password_file="/p", bearer_token_file="/t")]:
        with pytest.raises(pydantic.ValidationError):
            AlertSettings(**bad)
    with pytest.raises(pydantic.ValidationError):
        s.timeout = 3  # frozen
    assert all(f.description for f in AlertSettings.model_fields.values())


async def test_extra_labels_and_default_instance_follow_the_listener(clock, session, fakes):
    al = Alerter(AlertSettings(alertmanager_urls=[A], labels={"site": "par1"}), CollectorRegistry(), clock=clock,
                 sleep=clock.sleep, session_factory=lambda: session)
    al.listening_on(None, ("0.0.0.0", 9177))  # http.listen ":9177": scraped as HOSTNAME:9177
    await al.start()
    al.on_event(ev(clock.t, 1, "lifecycle", "CRASHED", "PANICKED"))
    await fakes.settle()
    [fired] = session.delivered()
    assert fired["labels"] == {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "domain": "web1",
                               "uuid": "u-1", "instance": f"{socket.gethostname()}:9177", "site": "par1"}
    await al.stop(0)
    fixed = Alerter(AlertSettings(instance="hv1.example.org:9177"), CollectorRegistry())
    fixed.listening_on("127.0.0.1", ("127.0.0.1", 40000))  # an explicit instance wins
    assert fixed.instance == "hv1.example.org:9177"


@pytest.mark.parametrize(("labels", "message"), [
    ({"instance": "x"}, "set by virtwatch itself"),
    ({"alertname": "x"}, "set by virtwatch itself"),
    ({"1site": "x"}, "not a Prometheus label name"),
    ({"__name__": "x"}, "not a Prometheus label name"),
    ({"site": ""}, "empty value"),
])
def test_extra_labels_are_validated(labels, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        AlertSettings(labels=labels)
