"""Alertmanager client: payloads, retries with backoff, queue bound, per-URL delivery, auth."""

from __future__ import annotations

import asyncio
import base64
import ssl

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from virtwatch.alerts.client import (
    AlertmanagerClient,
    AlertRecord,
    alert_payload,
    alerts_endpoint,
    retry_backoff,
    rfc3339,
)
from virtwatch.alerts.config import AlertSettings

A = "http://am-a:9093"
B = "http://am-b:9093"
EP_A = A + "/api/v2/alerts"
EP_B = B + "/api/v2/alerts"


def settings(**kw) -> AlertSettings:
    base = dict(alertmanager_urls=[A], instance="hv1", retry_min_delay=1.0, retry_max_delay=8.0,
                resend_interval=60.0, min_firing_duration=0.0)
    base.update(kw)
    return AlertSettings(**base)


def rec(name: str = "VirtwatchGuestCrashed", domain: str = "web1", starts: float = 1000.0,
        ends: float | None = None) -> AlertRecord:
    return AlertRecord({"alertname": name, "severity": "critical", "instance": "hv1", "domain": domain},
                       {"summary": f"{name} {domain}", "description": "d"}, starts, ends)


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def client(s, reg, clock, session, jitter=0.5):
    return AlertmanagerClient(s, reg, clock=clock, sleep=clock.sleep, session_factory=lambda: session,
                              jitter=lambda: jitter)


# -- pure helpers ----------------------------------------------------------------------

def test_rfc3339_is_utc_with_millis():
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1795959293.7316) == "2026-11-29T13:34:53.731Z"


def test_firing_payload_ends_four_resend_intervals_ahead():
    s = settings(generator_url="http://hv1:9177/")
    p = alert_payload(rec(starts=100.0), now=200.0, settings=s)
    assert p == {
        "labels": {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "instance": "hv1",
                   "domain": "web1"},
        "annotations": {"summary": "VirtwatchGuestCrashed web1", "description": "d",
                        "runbook_url": "https://virtwatch.dev/docs/runbooks/VirtwatchGuestCrashed.md"},
        "startsAt": "1970-01-01T00:01:40.000Z",
        "endsAt": rfc3339(200.0 + 4 * 60.0),
        "generatorURL": "http://hv1:9177/",  # the deprecated fixed link, unchanged
    }


def test_resolved_payload_honours_min_firing_duration_and_omits_empty_values():
    s = settings(min_firing_duration=60.0)
    r = AlertRecord({"alertname": "X", "domain": "", "instance": "hv1"}, {"summary": "s", "console": ""}, 100.0,
                    105.0)
    p = alert_payload(r, now=106.0, settings=s)
    assert p["endsAt"] == rfc3339(160.0)
    assert p["labels"] == {"alertname": "X", "instance": "hv1"}
    assert p["annotations"] == {"summary": "s", "runbook_url": "https://virtwatch.dev/docs/runbooks/X.md"}
    assert "generatorURL" not in p
    assert alert_payload(r, now=106.0, settings=settings())["endsAt"] == rfc3339(105.0)
    # A rule twin's resolve: never less than RESOLVE_GRACE (5 s) after sending, unless the rules are not used.
    twin = AlertRecord({"alertname": "VirtwatchGuestCrashed", "instance": "hv1"}, {}, 100.0, 105.0)
    assert alert_payload(twin, now=106.0, settings=settings())["endsAt"] == rfc3339(111.0)
    assert alert_payload(twin, now=99.0, settings=settings())["endsAt"] == rfc3339(105.0)
    assert alert_payload(twin, now=106.0, settings=settings(rule_window=0))["endsAt"] == rfc3339(105.0)


def test_links_from_external_url_and_runbook_base():
    s = settings(external_url="http://hv1:9177/", runbook_base_url="https://wiki/rb/")
    assert (s.external_url, s.runbook_base_url) == ("http://hv1:9177", "https://wiki/rb")
    p = alert_payload(rec(domain="a b?c#d%e"), now=200.0, settings=s)
    assert p["generatorURL"] == "http://hv1:9177/api/v1/guests/a%20b%3Fc%23d%25e"
    assert p["annotations"]["runbook_url"] == "https://wiki/rb/VirtwatchGuestCrashed.md"
    host = AlertRecord({"alertname": "VirtwatchLibvirtConnectionLost", "instance": "hv1"}, {"summary": "s"}, 1.0)
    assert alert_payload(host, now=2.0, settings=s)["generatorURL"] == "http://hv1:9177/"
    proxied = settings(external_url="https://ops.example.org/virtwatch/hv1")
    assert proxied.link("web1") == "https://ops.example.org/virtwatch/hv1/api/v1/guests/web1"
    # An annotation the alert sets itself wins over the configured base.
    own = AlertRecord(rec().labels, {"summary": "s", "runbook_url": "https://elsewhere/x"}, 1.0)
    assert alert_payload(own, now=2.0, settings=s)["annotations"]["runbook_url"] == "https://elsewhere/x"


def test_link_settings_are_validated_and_generator_url_is_deprecated():
    for bad in ({"external_url": "hv1:9177"}, {"runbook_base_url": "ftp://x/"},
                {"external_url": "http://hv1:9177", "generator_url": "http://hv1:9177/"}):
        with pytest.raises(ValidationError):
            settings(**bad)
    assert settings(generator_url="http://hv1:9177/").warnings() != []
    assert settings(external_url="http://hv1:9177").warnings() == []
    assert settings().link("web1") is None  # no external_url: no link, as before


def test_endpoint():
    assert alerts_endpoint("http://am:9093") == "http://am:9093/api/v2/alerts"
    assert alerts_endpoint("https://am/prefix/") == "https://am/prefix/api/v2/alerts"
    assert alerts_endpoint("http://am:9093/api/v2/alerts") == "http://am:9093/api/v2/alerts"


def test_backoff_doubles_is_capped_and_jittered():
    s = settings(retry_min_delay=1.0, retry_max_delay=8.0)
    assert [retry_backoff(s, lambda: 1.0).delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [retry_backoff(s, lambda: 0.0).delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert retry_backoff(s, lambda: 0.5).delay(1001) == 6.0


# -- delivery ----------------------------------------------------------------------------

async def test_alert_is_posted_at_once_without_any_clock_advance(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    assert [(u, [a["labels"]["alertname"] for a in kw["json"]]) for u, kw, _ in session.requests] == [
        (EP_A, ["VirtwatchGuestCrashed"])]
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 1
    assert metric(reg, "virtwatch_alerts_queue_length", alertmanager=A) == 0
    assert clock.sleeps == []
    await c.stop(0)
    assert session.closed


async def test_retries_with_capped_exponential_backoff_then_delivers(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session, jitter=1.0)
    session.script[EP_A].extend([fakes.conn_error(), 503, TimeoutError(), fakes.conn_error(), fakes.conn_error()])
    await c.start()
    c.submit(rec())
    await fakes.settle()
    assert clock.sleeps == [1.0]
    assert metric(reg, "virtwatch_alerts_queue_length", alertmanager=A) == 1
    for delay in (1.0, 2.0, 4.0, 8.0):
        await clock.advance(delay)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert metric(reg, "virtwatch_alerts_failed_total", alertmanager=A) == 5
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 0
    await clock.advance(8.0)
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 1
    assert metric(reg, "virtwatch_alerts_queue_length", alertmanager=A) == 0
    assert len(session.requests) == 6
    # The payload is built at send time: endsAt relative to the delivery, not the first try.
    [delivered] = session.delivered()
    assert delivered["endsAt"] == rfc3339(clock.t + 240.0)
    # Success resets the backoff.
    session.script[EP_A].append(fakes.conn_error())
    c.submit(rec(domain="db1"))
    await fakes.settle()
    assert clock.sleeps[-1] == 1.0
    await c.stop(0)


async def test_queue_bound_drops_oldest_and_counts(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(queue_size=3), reg, clock, session)
    for d in ["a", "b", "c", "d", "e"]:
        c.submit(rec(domain=d))
    assert metric(reg, "virtwatch_alerts_dropped_total", alertmanager=A, reason="queue_full") == 2
    assert metric(reg, "virtwatch_alerts_queue_length", alertmanager=A) == 3
    await c.start()
    await fakes.settle()
    assert [a["labels"]["domain"] for a in session.delivered()] == ["c", "d", "e"]
    await c.stop(0)


async def test_newer_state_of_same_alert_replaces_pending_one(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    c.submit(rec(domain="a"))
    c.submit(rec(domain="b"))
    c.submit(rec(domain="a", ends=1010.0))
    assert c.queue_lengths() == {A: 2}
    await c.start()
    await fakes.settle()
    got = [(a["labels"]["domain"], a["endsAt"]) for a in session.delivered()]
    # "a" healed before it was ever delivered: held active for late_resolved_hold (330 s) from now.
    assert got == [("b", rfc3339(clock.t + 240)), ("a", rfc3339(clock.t + 330))]
    assert session.delivered()[1]["annotations"]["resolved_at"] == rfc3339(1010.0)
    assert metric(reg, "virtwatch_alerts_dropped_total", alertmanager=A, reason="queue_full") == 0
    await c.stop(0)


async def test_failed_batch_does_not_overwrite_a_newer_state(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    session.script[EP_A].append(fakes.conn_error())
    await c.start()
    c.submit(rec(domain="a"))
    await fakes.settle()                   # first POST failed, sender sleeps
    c.submit(rec(domain="a", ends=1005.0))  # resolved meanwhile
    retry_from = clock.t
    await clock.advance(1.0)
    # Never accepted firing: a late resolve, active until late_resolved_hold after its delivery
    # (the retry, 0.5-1 s later with jitter).
    [ends] = [a["endsAt"] for a in session.delivered()]
    assert rfc3339(retry_from + 330.5) <= ends <= rfc3339(retry_from + 331.0)
    await c.stop(0)


async def test_each_alertmanager_has_its_own_queue(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(alertmanager_urls=[A, B]), reg, clock, session)
    session.default[EP_A] = fakes.conn_error()
    await c.start()
    c.submit(rec(domain="x"))
    await fakes.settle()
    assert [a["labels"]["domain"] for a in session.delivered(EP_B)] == ["x"]
    assert session.delivered(EP_A) == []
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=B) == 1
    assert metric(reg, "virtwatch_alerts_failed_total", alertmanager=A) == 1
    assert c.queue_lengths() == {A: 1, B: 0}
    session.default[EP_A] = 200
    await clock.advance(1.0)
    assert [a["labels"]["domain"] for a in session.delivered(EP_A)] == ["x"]
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 1
    await c.stop(0)


async def test_client_error_is_not_retried_but_counted(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    session.script[EP_A].append(400)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    assert metric(reg, "virtwatch_alerts_dropped_total", alertmanager=A, reason="rejected") == 1
    assert metric(reg, "virtwatch_alerts_failed_total", alertmanager=A) == 1
    assert clock.sleeps == [] and c.queue_lengths() == {A: 0}
    await c.stop(0)


async def test_too_many_requests_is_retried(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    session.script[EP_A].append(429)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    await clock.advance(1.0)
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 1
    await c.stop(0)


async def test_stop_counts_undelivered_as_dropped(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    session.default[EP_A] = fakes.conn_error()
    await c.start()
    c.submit(rec(domain="a"))
    c.submit(rec(domain="b"))
    await fakes.settle()
    await c.stop(flush_timeout=0.005)
    assert metric(reg, "virtwatch_alerts_dropped_total", alertmanager=A, reason="shutdown") == 2
    assert metric(reg, "virtwatch_alerts_queue_length", alertmanager=A) == 0


async def test_stop_during_a_hung_post_counts_the_batch_as_unsent(clock, fakes):
    class HangingSession:
        def post(self, url, **kw):
            return self

        async def __aenter__(self):
            await asyncio.get_running_loop().create_future()  # never answers

        async def __aexit__(self, *exc):
            return None

        async def close(self):
            return None

    reg = CollectorRegistry()
    c = AlertmanagerClient(settings(), reg, clock=clock, sleep=clock.sleep, session_factory=HangingSession)
    await c.start()
    c.submit(rec(domain="a"))
    await fakes.settle()
    await c.stop(flush_timeout=0.005)
    assert metric(reg, "virtwatch_alerts_dropped_total", alertmanager=A, reason="shutdown") == 1
    assert metric(reg, "virtwatch_alerts_sent_total", alertmanager=A) == 0


async def test_stop_flushes_pending_alerts(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(), reg, clock, session)
    await c.start()
    c.submit(rec())
    await c.stop(flush_timeout=1.0)
    assert len(session.delivered()) == 1


async def test_bearer_token_and_ca_file(tmp_path, clock, session, fakes):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text(_SELF_SIGNED_CA)
    c = client(settings(bearer_token_file=str(tok), tls_ca_file=str(ca)), CollectorRegistry(), clock, session)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    [(_, kw, _)] = session.requests
    assert kw["headers"] == {"Authorization": "Bearer s3cret"}
    assert isinstance(kw["ssl"], ssl.SSLContext) and kw["ssl"].verify_mode == ssl.CERT_REQUIRED
    assert kw["timeout"].total == 5.0
    await c.stop(0)


async def test_basic_auth_and_insecure_tls(tmp_path, clock, session, fakes):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    c = client(settings(basic_auth_username="vw", basic_auth_password_file=str(pw), tls_insecure_skip_verify=True),
               CollectorRegistry(), clock, session)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    [(_, kw, _)] = session.requests
    assert kw["headers"] == {"Authorization": "Basic " + base64.b64encode(b"vw:hunter2").decode()}
    assert kw["ssl"] is False
    await c.stop(0)


async def test_disabled_client_posts_nothing(clock, session, fakes):
    reg = CollectorRegistry()
    c = client(settings(alertmanager_urls=[]), reg, clock, session)
    await c.start()
    c.submit(rec())
    await fakes.settle()
    await c.stop(1.0)
    assert session.requests == [] and c.queue_lengths() == {}


# A throwaway self-signed CA certificate (its key was discarded): only loaded as a trust anchor.
_SELF_SIGNED_CA = """-----BEGIN CERTIFICATE-----
MIIBjDCCATOgAwIBAgIUTp3C5dHZENL+kYeW1oHPjS5eSAEwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRdmlydHdhdGNoLXRlc3QtY2EwHhcNMjYxMTI5MTQxNjA5WhcN
MzYxMTI2MTQxNjA5WjAcMRowGAYDVQQDDBF2aXJ0d2F0Y2gtdGVzdC1jYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABExQrAL4wPdpB5dD3gABNUEVLkjxOmo+iEB9
1gg/mI+qBYQAxFVA+0grsQuHdPMAXNpDh8VdN6UoZSuyEK3IvQWjUzBRMB0GA1Ud
DgQWBBQCPu5vQPSprIGjvs466GwEo7zQ1jAfBgNVHSMEGDAWgBQCPu5vQPSprIGj
vs466GwEo7zQ1jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIFrN
ax+Y3OYqf84vjmu1xxyR/PQETQt/8TEx374m4KKdAiADe+5BggfaIR39FpXR8kxb
pQ9Sm/qBKZSsBBEZu3nz0Q==
-----END CERTIFICATE-----
"""
