"""Alert identity (the default ``instance``), the spool file, and the client's spooling and
late-resolve logic (fake HTTP session, fake clock, real files in tmp_path)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from virtwatch.alerts.client import AlertmanagerClient, alert_payload, delivery, rfc3339
from virtwatch.alerts.config import AlertSettings, default_instance
from virtwatch.alerts.record import AlertRecord
from virtwatch.alerts.spool import Spool, SpoolError, decode, encode

A = "http://am-a:9093"
B = "http://am-b:9093"
EP_A = A + "/api/v2/alerts"


def rec(domain: str = "web1", starts: float = 1000.0, ends: float | None = None) -> AlertRecord:
    return AlertRecord({"alertname": "VirtwatchGuestCrashed", "severity": "critical", "instance": "hv1:9177",
                        "domain": domain, "uuid": f"u-{domain}"}, {"summary": f"crash {domain}"}, starts, ends)


def client(tmp_path, clock, session, urls=(A,), **kw) -> tuple[AlertmanagerClient, CollectorRegistry]:
    s = AlertSettings(alertmanager_urls=list(urls), instance="hv1:9177", retry_min_delay=1.0, retry_max_delay=8.0,
                      min_firing_duration=0.0, **kw)
    reg = CollectorRegistry()
    return AlertmanagerClient(s, reg, clock=clock, sleep=clock.sleep, session_factory=lambda: session,
                              jitter=lambda: 0.5, spool=Spool(tmp_path / "state" / "alerts-spool.json")), reg


@pytest.mark.parametrize(("host", "port", "expected"), [
    (None, 9177, "hv01:9177"),            # ":9177": every address, scraped by the host's name
    ("0.0.0.0", 9177, "hv01:9177"),
    ("::", 9100, "hv01:9100"),
    ("[::]", 9177, "hv01:9177"),
    ("127.0.0.1", 40123, "127.0.0.1:40123"),  # only reachable there: the scrape target says so
    ("10.0.0.5", 9177, "10.0.0.5:9177"),
    ("::1", 9177, "[::1]:9177"),          # IPv6 in brackets, as Prometheus writes the target
    ("hv01.example.org", 9177, "hv01.example.org:9177"),
])
def test_default_instance_is_the_scrape_target(host, port, expected):
    assert default_instance(host, port, "hv01") == expected


def test_empty_instance_is_refused():
    with pytest.raises(ValueError, match="instance must not be empty"):
        AlertSettings(instance=" ")


def test_delivery_late_only_when_no_alertmanager_accepted_it_firing():
    k, s = rec().key, AlertSettings()
    assert delivery(rec(), {}, {}, s) == "send"                                   # firing
    assert delivery(rec(ends=1005.0), {k: 1000.0}, {k: 1000.0}, s) == "send"      # accepted here: a resolve
    assert delivery(rec(ends=1005.0), {}, {}, s) == "late"                        # never notified anywhere
    assert delivery(rec(starts=2000.0, ends=2005.0), {k: 1000.0}, {k: 1000.0}, s) == "late"  # an earlier one was
    # Another member notified it (or this one was unreachable since): its real endsAt; a rule twin not at all.
    assert delivery(rec(ends=1005.0), {}, {k: 1000.0}, s) == "skip"
    assert delivery(rec(ends=1005.0), {}, {k: 1000.0}, AlertSettings(rule_window=0)) == "past"
    wd = AlertRecord({"alertname": "VirtwatchWatchdogFired", "domain": "web1"}, {}, 1000.0, 1005.0)
    assert delivery(wd, {}, {wd.key: 1000.0}, s) == "past"


def test_encode_decode_round_trip():
    pending = {A: [(rec("a"), False, False), (rec("b", ends=1009.5), True, True), (rec("c", ends=1.0), False, True)],
               B: []}
    data = encode(pending)
    assert decode(data) == {A: pending[A]}  # an Alertmanager with nothing pending is left out
    assert json.loads(data)["version"] == 1


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b'{"version": 2, "alertmanagers": {}}', "expected version 1, got 2"),
    (b"[]", "expected version 1"),
    (b'{"version": 1, "alertmanagers": []}', "alertmanagers: expected an object"),
    (b'{"version": 1, "alertmanagers": {"u": [{"labels": {}, "starts_at": 1}]}}', "no alertname"),
    (b'{"version": 1, "alertmanagers": {"u": [{"labels": {"alertname": "X"}, "starts_at": "now"}]}}',
     "starts_at: expected epoch seconds"),
    (b'{"version": 1, "alertmanagers": {"u": [{"labels": {"alertname": 1}, "starts_at": 1}]}}',
     "labels: expected an object of strings"),
    (b'{"version": 1, "alertmanagers": {"u": [{"labels": {"alertname": "X"}, "starts_at": 1, "fired_anywhere": 1}]}}',
     "must be true or false"),
    (b'{"version": 1, "alertmanagers": {"u": [{"labels": {"alertname": "X"}, "starts_at": 1, "ends_at": -1}]}}',
     "ends_at: expected epoch seconds"),
])
def test_decode_refuses_what_is_not_a_spool(data, message):
    with pytest.raises(SpoolError, match=message):
        decode(data)


def test_corrupt_spool_is_moved_aside_and_reads_as_empty(tmp_path):
    path = tmp_path / "alerts-spool.json"
    path.write_bytes(b'{"version": 1, "alertm')
    pending, problem, moved = Spool(path).load()
    assert pending == {} and "not JSON" in problem
    assert not path.exists() and moved is not None and moved.read_bytes() == b'{"version": 1, "alertm'
    assert moved.name.startswith("alerts-spool.json.corrupt-")
    assert Spool(tmp_path / "missing.json").load() == ({}, None, None)


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    sp = Spool(tmp_path / "state" / "alerts-spool.json")
    sp.write(encode({A: [(rec(), False, False)]}))
    sp.write(encode({}))
    assert decode(sp.path.read_bytes()) == {}
    assert [p.name for p in sp.path.parent.iterdir()] == ["alerts-spool.json"]


async def test_undelivered_alerts_are_spooled_at_stop_and_sent_by_the_next_client(tmp_path, clock, session, fakes):
    session.default[EP_A] = fakes.conn_error()
    c, reg = client(tmp_path, clock, session)
    await c.start()
    c.submit(rec("a"))                  # healed before delivery: fire, then resolve
    c.submit(rec("a", ends=1004.0))
    c.submit(rec("b"))                  # still firing
    await fakes.settle()
    await c.stop(flush_timeout=0.005)
    assert reg.get_sample_value("virtwatch_alerts_dropped_total", {"alertmanager": A, "reason": "shutdown"}) is None
    on_disk = decode((tmp_path / "state" / "alerts-spool.json").read_bytes())
    assert on_disk == {A: [(rec("a", ends=1004.0), False, False), (rec("b"), False, False)]}

    session.default[EP_A] = 200         # Alertmanager back, daemon restarted
    c2, reg2 = client(tmp_path, clock, session)
    await c2.start()
    await fakes.settle()
    sent = [(a["labels"]["domain"], a["startsAt"], a["endsAt"]) for a in session.delivered()]
    assert sent == [("a", rfc3339(1000.0), rfc3339(clock.t + 330)),  # original startsAt, endsAt ahead
                    ("b", rfc3339(1000.0), rfc3339(clock.t + 240))]
    assert reg2.get_sample_value("virtwatch_alerts_sent_total", {"alertmanager": A}) == 2
    await c2.stop(0)
    assert decode((tmp_path / "state" / "alerts-spool.json").read_bytes()) == {}


def watchdog(ends: float | None = None) -> AlertRecord:
    return AlertRecord({"alertname": "VirtwatchWatchdogFired", "instance": "hv1:9177", "domain": "w"}, {}, 1000.0,
                       ends)


async def test_a_resolve_after_an_outage_of_an_alertmanager_that_had_it_firing_is_not_a_new_incident(
        tmp_path, clock, session, fakes):
    # Accepted firing, then Alertmanager went down (it may come back restarted, without the alert)
    # and the guest healed; the daemon restarts in between. Notified already: not late. The
    # watchdog alert goes with its real endsAt (past: resolved there whatever it holds); the rule
    # twin is not sent (a past endsAt would end the merged alert Prometheus still fires).
    c, _ = client(tmp_path, clock, session)
    await c.start()
    c.submit(rec("a"))
    c.submit(watchdog())
    await fakes.settle()                  # both accepted firing
    session.default[EP_A] = fakes.conn_error()
    c.submit(rec("a", ends=1003.0))
    c.submit(watchdog(ends=1003.0))
    await fakes.settle()
    await c.stop(0.005)
    assert [(r.labels["alertname"], here, anywhere) for r, here, anywhere in
            decode((tmp_path / "state" / "alerts-spool.json").read_bytes())[A]] \
        == [("VirtwatchGuestCrashed", False, True), ("VirtwatchWatchdogFired", False, True)]
    session.default[EP_A] = 200
    sent_before = len(session.delivered())
    c2, _ = client(tmp_path, clock, session)
    await c2.start()
    await fakes.settle()
    [resolved] = session.delivered()[sent_before:]
    assert resolved["labels"]["alertname"] == "VirtwatchWatchdogFired"
    assert resolved["endsAt"] == rfc3339(1003.0) and "resolved_at" not in resolved["annotations"]
    await c2.stop(0)
    assert decode((tmp_path / "state" / "alerts-spool.json").read_bytes()) == {}


async def test_spooled_alerts_of_an_alertmanager_no_longer_configured_are_not_sent(tmp_path, clock, session, fakes):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "alerts-spool.json").write_bytes(
        encode({B: [(rec("x"), False, False)], A: [(rec("y"), False, False)]}))
    c, _ = client(tmp_path, clock, session)
    await c.start()
    await fakes.settle()
    assert [(u, a["labels"]["domain"]) for u, kw, _ in session.requests for a in kw["json"]] == [(EP_A, "y")]
    await c.stop(0)


async def test_corrupt_spool_gives_a_working_client(tmp_path, clock, session, fakes):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "alerts-spool.json").write_text("garbage")
    c, _ = client(tmp_path, clock, session)
    await c.start()
    c.submit(rec("z"))
    await fakes.settle()
    assert [a["labels"]["domain"] for a in session.delivered()] == ["z"]
    await c.stop(0)
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names[0] == "alerts-spool.json" and names[1].startswith("alerts-spool.json.corrupt-")
    assert (tmp_path / "state" / names[1]).read_text() == "garbage" and len(names) == 2


async def test_restored_queue_is_bounded_by_queue_size(tmp_path, clock, session, fakes):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "alerts-spool.json").write_bytes(
        encode({A: [(rec(f"g{i}"), False, False) for i in range(5)]}))
    c, _ = client(tmp_path, clock, session, queue_size=2)
    await c.start()
    await fakes.settle()
    assert [a["labels"]["domain"] for a in session.delivered()] == ["g3", "g4"]  # the newest
    await c.stop(0)


def test_late_rule_twin_past_the_rule_window_is_labelled_apart():
    s = AlertSettings(instance="hv1:9177", rule_window=900.0, late_resolved_hold=330.0)
    healed = rec(ends=1005.0)
    within = alert_payload(healed, 1005.0 + 600, s, late=True)   # twin still firing: merge with it
    assert "delivery" not in within["labels"]
    assert within["endsAt"] == rfc3339(1005.0 + 600 + 330)
    past = alert_payload(healed, 1005.0 + 901, s, late=True)     # twin resolved: a copy of its own
    assert past["labels"]["delivery"] == "late"
    assert past["startsAt"] == rfc3339(1000.0) and past["annotations"]["resolved_at"] == rfc3339(1005.0)
    other = AlertRecord({"alertname": "VirtwatchWatchdogFired", "instance": "hv1:9177"}, {}, 1000.0, 1005.0)
    assert "delivery" not in alert_payload(other, 1005.0 + 901, s, late=True)["labels"]  # no rule twin
    assert "delivery" not in alert_payload(healed, 1005.0 + 901, s, late=False)["labels"]


async def test_a_resolve_goes_only_where_the_firing_state_went_and_survives_a_restart(tmp_path, clock, session,
                                                                                    fakes):
    # Cluster member B was down when the crash fired; A notified it. B must not get the resolve
    # (to B it would be a new alert after the cluster resolved it: a second page), not even after
    # a daemon restart, and A's resolve is an ordinary one.
    ep_b = B + "/api/v2/alerts"
    session.default[ep_b] = fakes.conn_error()
    c, _ = client(tmp_path, clock, session, urls=(A, B))
    await c.start()
    c.submit(rec("a"))
    await fakes.settle()
    c.submit(rec("a", ends=1004.0))
    await fakes.settle()
    assert [x["endsAt"] for x in session.delivered(EP_A)] == [rfc3339(clock.t + 240), rfc3339(clock.t + 5)]
    await c.stop(0.005)
    assert decode((tmp_path / "state" / "alerts-spool.json").read_bytes()) == {B: [(rec("a", ends=1004.0), False,
                                                                                    True)]}
    session.default[ep_b] = 200
    c2, _ = client(tmp_path, clock, session, urls=(A, B))
    await c2.start()
    await fakes.settle()
    assert session.delivered(ep_b) == []
    assert c2.queue_lengths() == {A: 0, B: 0}
    await c2.stop(0)
    assert decode((tmp_path / "state" / "alerts-spool.json").read_bytes()) == {}


async def test_every_member_gets_a_late_alert_with_the_endsat_of_its_first_delivery(tmp_path, clock, session,
                                                                                   fakes):
    # Members that resolve one alert at different times page twice: the first one's "all resolved"
    # clears the shared notification log while the other still has it firing. So B, back later
    # (even after a daemon restart), gets A's endsAt and labels, not ones of its own.
    ep_b = B + "/api/v2/alerts"
    session.default[EP_A] = session.default[ep_b] = fakes.conn_error()
    c, _ = client(tmp_path, clock, session, urls=(A, B), rule_window=60.0)
    await c.start()
    c.submit(rec("a", ends=1004.0))
    await fakes.settle()
    await clock.advance(100.0)
    session.default[EP_A] = 200
    await clock.advance(10.0)
    [at_a] = session.delivered(EP_A)
    first = clock.t
    assert at_a["labels"]["delivery"] == "late"     # first delivered more than rule_window after it healed
    await c.stop(0.005)
    [(spooled, _, _)] = decode((tmp_path / "state" / "alerts-spool.json").read_bytes())[B]
    assert spooled.late_at is not None and spooled.late_at <= first
    await clock.advance(200.0)
    session.default[ep_b] = 200
    c2, _ = client(tmp_path, clock, session, urls=(A, B), rule_window=60.0)
    await c2.start()
    await fakes.settle()
    [at_b] = session.delivered(ep_b)
    assert (at_b["labels"], at_b["startsAt"], at_b["endsAt"]) == (at_a["labels"], at_a["startsAt"], at_a["endsAt"])
    await c2.stop(0)
