"""Alerting end to end: real Prometheus, real Alertmanager, real ``virtwatch run``, real guests.

One stack per module (tests run in file order and share it):

- an Alertmanager (``prometheus-alertmanager``) on a loopback port;
- ``virtwatch run`` on qemu:///system with the policy on for guests named
  ``vwe2e-alpol-*`` (restart after 1 s) and instant alerts posted to that Alertmanager
  with ``min_firing_duration = 0``;
- a Prometheus scraping virtwatch every second, evaluating a copy of the shipped
  ``config/prometheus/virtwatch-alerts.yml`` every second (only the ``for:`` durations
  shortened to 1 s; expressions, labels and annotations are the shipped ones) and
  sending its alerts to the same Alertmanager.

The policy glob is narrower than ``vwe2e-*`` on purpose: other e2e tests (possibly
running at the same time on this host) make ``vwe2e-*`` guests that crash on purpose and
must not be restarted by this daemon.
"""

from __future__ import annotations

import datetime
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
import yaml

from hostlib import REPO_ROOT, GuestFactory, GuestImage, VirtwatchProcess, sample
from hostlib.guests import Guest
from hostlib.promstack import AlertmanagerProcess, AlertWatcher, PrometheusProcess, rules_with_short_for, wait_until

SHIPPED_RULES = REPO_ROOT / "config" / "prometheus" / "virtwatch-alerts.yml"
POLICY_LABEL = "alpol"  # guests vwe2e-alpol-* are managed by the policy


@dataclass
class Stack:
    am: AlertmanagerProcess
    vw: VirtwatchProcess
    prom: PrometheusProcess
    shipped: dict
    rules_file: Path
    watcher: AlertWatcher

    def events(self, domain: str) -> list[dict]:
        return self.vw.json(f"/api/v1/events?since=0&domain={domain}&limit=1000")["events"]

    def metric(self, name: str, **labels: str) -> float | None:
        return sample(self.vw.scrape(), name, **labels)

    def prom_alerts(self, alertname: str, state: str = "firing", **labels: str) -> list[dict]:
        return [a for a in self.prom.alerts() if a["labels"].get("alertname") == alertname and a["state"] == state
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def diag(self) -> str:
        return (f"--- virtwatch log tail\n{self.vw.log_tail(30)}\n--- alertmanager log\n{self.am.log_text()[-1500:]}"
                f"\n--- prometheus log\n{self.prom.log_text()[-1500:]}")


def vw_config(workdir: Path, am_url: str) -> str:
    return f"""
[stats]
poll_interval = 1.0

[log]
events = true

[daemon]
state_dir = "{workdir / 'state'}"
socket = "{workdir / 'virtwatch.sock'}"
shutdown_timeout = 10.0

[policy]
enabled = true
debounce = 0.1
own_event_grace = 1.0
boot_settle_timeout = 1.0
boot_settle_quiet = 0.5

[policy.defaults]
restart_delay = 1.0
restart_jitter = 0.0
restart_backoff = 1.0
limit_burst = 20

[[policy.match]]
glob = "vwe2e-{POLICY_LABEL}-*"

[alerts]
alertmanager_urls = ["{am_url}"]
# Not the default (127.0.0.1:PORT, Prometheus' instance here): with it, Alertmanager would merge
# the instant VirtwatchGuestCrashed with its rule twin, and these tests look at the instant
# alerts alone (test_fleet_alerting.py covers the merge).
instance = "{socket.gethostname()}"
rule_window = 0
min_firing_duration = 0
retry_min_delay = 0.2
retry_max_delay = 1.0
"""


def am_time(s: str) -> float:
    """Alertmanager's RFC 3339 timestamp (nanoseconds, Z) as epoch seconds."""
    s = s.replace("Z", "+00:00")
    head, _, tz = s.partition("+")
    if "." in head:
        head, frac = head.split(".")
        head = f"{head}.{frac[:6]}"
    return datetime.datetime.fromisoformat(f"{head}+{tz}").timestamp()


@pytest.fixture(scope="module")
def factory(guest_image: GuestImage) -> Iterator[GuestFactory]:
    f = GuestFactory(guest_image, test_name="alerting-e2e")
    try:
        yield f
    finally:
        try:
            f.cleanup()
        except libvirt.libvirtError:
            # Another e2e session on this host may be restarting libvirtd right now: wait for it, retry once.
            wait_until(libvirtd_answers, 120, "libvirtd back for cleanup", interval=1.0)
            f.cleanup()


@dataclass
class Guests:
    paused: Guest  # unmanaged, no NIC: suspended and resumed by test 1
    crashing: Guest  # managed by the policy, panics 4 s after every boot


@pytest.fixture(scope="module")
def guests(stack: Stack, factory: GuestFactory) -> Guests:
    """Guests that boot in parallel (TCG boots are slow on a busy host) once the stack is up."""
    # No NIC on the paused one: resuming a guest whose tap has a host-side <ip> fails on
    # libvirt 9.0 ("Failed to add IP address ... to vnetN": the address is re-added on resume).
    paused = factory.create("alobs", network=False, wait=False)
    crashing = factory.create(POLICY_LABEL, options={"panic": 4}, persistent=True, wait=False)
    return Guests(paused, crashing)


def libvirtd_answers() -> bool:
    try:
        libvirt.open("qemu:///system").close()
        return True
    except libvirt.libvirtError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, e2e_host: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("alerting")
    am = AlertmanagerProcess(tmp / "alertmanager")
    vw = VirtwatchProcess(tmp / "virtwatch", uri=e2e_host, poll_interval=1.0)
    prom: PrometheusProcess | None = None
    watcher = AlertWatcher(am, interval=0.01)  # polls Alertmanager every ~10 ms from the start
    try:
        am.start()
        vw.config_path.write_text(vw_config(vw.workdir, am.url))
        vw.start()
        rules = tmp / "virtwatch-alerts.short-for.yml"
        shipped = rules_with_short_for(SHIPPED_RULES, rules, "1s")
        prom = PrometheusProcess(tmp / "prometheus", [f"127.0.0.1:{vw.port}"], rule_files=[rules],
                                 alertmanagers=[am.url], interval="1s")
        prom.start()
        watcher.start()
        yield Stack(am, vw, prom, shipped, rules, watcher)
    finally:
        watcher.stop()
        if prom is not None:
            prom.stop()
        rc = vw.stop()
        am.stop()
        log = vw.log_text()
        assert rc == 0, vw.log_tail()
        assert "Traceback" not in log, log[-5000:]


def test_prometheus_scrapes_virtwatch_and_evaluates_the_shipped_rules(stack: Stack, guests: Guests) -> None:
    prom, vw = stack.prom, stack.vw
    guest = guests.paused

    def target_up() -> bool:
        return any(t["labels"].get("job") == "virtwatch" and t["scrapeUrl"] == f"{vw.base}/metrics"
                   and t["health"] == "up" for t in prom.targets())

    wait_until(target_up, 20, "virtwatch target up in Prometheus", detail=stack.diag)
    [up] = wait_until(lambda: prom.query('libvirt_up{job="virtwatch"}'), 10, "libvirt_up in Prometheus")
    assert up["metric"]["instance"] == f"127.0.0.1:{vw.port}"
    assert up["value"][1] == "1"

    # Every shipped group and rule is loaded, unchanged apart from `for:`, and evaluates cleanly.
    shipped = {g["name"]: {r["alert"]: r for r in g["rules"]} for g in stack.shipped["groups"]}
    loaded = yaml.safe_load(stack.rules_file.read_text())  # what Prometheus got: same expressions
    assert [[(r["alert"], r["expr"], r["labels"], r["annotations"]) for r in g["rules"]] for g in loaded["groups"]] \
        == [[(r["alert"], r["expr"], r["labels"], r["annotations"]) for r in g["rules"]]
            for g in stack.shipped["groups"]]

    def evaluated() -> list[dict] | None:
        groups = prom.rule_groups()
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules):
            return groups
        return None

    groups = wait_until(evaluated, 10, "all rules evaluated with health ok",
                        detail=lambda: str([(r["name"], r["health"], r.get("lastError")) for g in prom.rule_groups()
                                            for r in g["rules"]]))
    assert {g["name"]: {r["name"] for r in g["rules"]} for g in groups} == {k: set(v) for k, v in shipped.items()}
    for g in groups:
        assert g["interval"] == 1
        for r in g["rules"]:
            src = shipped[g["name"]][r["name"]]
            assert r["type"] == "alerting"
            assert r["labels"] == src["labels"]
            assert r["annotations"] == src["annotations"]
            assert r["duration"] == (0 if src["for"] in ("0m", "0s") else 1)
            assert not r.get("lastError"), r

    # A real condition: a guest paused by the admin -> LibvirtGuestPausedLong pending, then firing,
    # then sent by Prometheus to the Alertmanager; resuming clears it.
    guest.wait_for_serial("VW READY")
    subprocess.run(["virsh", "-c", "qemu:///system", "suspend", guest.name], check=True, capture_output=True)
    try:
        wait_until(lambda: stack.metric("libvirt_domain_state_code", domain=guest.name) == 3, 10,
                   "paused state exported")
        wait_until(lambda: stack.prom_alerts("LibvirtGuestPausedLong", "pending", domain=guest.name)
                   or stack.prom_alerts("LibvirtGuestPausedLong", "firing", domain=guest.name),
                   10, "LibvirtGuestPausedLong pending", detail=stack.diag)
        [firing] = wait_until(lambda: stack.prom_alerts("LibvirtGuestPausedLong", domain=guest.name), 10,
                              "LibvirtGuestPausedLong firing", detail=stack.diag)
        assert firing["labels"] == {"alertname": "LibvirtGuestPausedLong", "severity": "warning",
                                    "domain": guest.name, "instance": f"127.0.0.1:{vw.port}", "job": "virtwatch"}
        assert firing["annotations"]["summary"] == \
            f"Guest {guest.name} on 127.0.0.1:{vw.port} has been paused for 30 minutes"
        # Not the I/O-error rule: reason is USER (1), not IOERROR (5).
        assert not stack.prom_alerts("LibvirtGuestPausedIOError", domain=guest.name)
        [in_am] = wait_until(lambda: stack.am.alerts(alertname="LibvirtGuestPausedLong", domain=guest.name), 10,
                             "LibvirtGuestPausedLong in Alertmanager", detail=stack.diag)
        assert in_am["labels"]["job"] == "virtwatch"
        assert "/graph?g0.expr=" in in_am["generatorURL"]  # sent by Prometheus, not by virtwatch
    finally:
        guest.dom.resume()
    wait_until(lambda: not stack.prom_alerts("LibvirtGuestPausedLong", "pending", domain=guest.name)
               and not stack.prom_alerts("LibvirtGuestPausedLong", domain=guest.name), 10,
               "LibvirtGuestPausedLong cleared after resume")
    # No instant alert for an admin pause/resume.
    assert not stack.am.alerts(domain=guest.name, severity="critical")


def test_guest_panic_reaches_alertmanager_within_a_second_and_resolves_after_restart(
        stack: Stack, guests: Guests) -> None:
    am, guest = stack.am, guests.crashing
    uuid = guest.dom.UUIDString()

    # The watcher has polled Alertmanager every ~10 ms since before the guest booted.
    [(seen_at, alert), *_] = wait_until(lambda: stack.watcher.first_seen("VirtwatchGuestCrashed", guest.name), 90,
                                        "VirtwatchGuestCrashed in Alertmanager", interval=0.05, detail=stack.diag)
    crash = next(e for e in stack.events(guest.name) if e["kind"] == "lifecycle" and e["event"] == "CRASHED")
    assert crash["detail"] == "PANICKED"
    assert abs(am_time(alert["startsAt"]) - crash["time"]) < 0.002  # this alert is that event's
    assert stack.watcher.started_at < crash["time"]
    latency = seen_at - crash["time"]
    print(f"event->Alertmanager latency: {latency * 1000:.1f} ms")
    assert latency < 1.0, f"instant alert took {latency:.3f} s from the event"

    assert alert["labels"] == {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "domain": guest.name,
                               "uuid": uuid, "instance": socket.gethostname()}
    assert alert["annotations"]["summary"] == f"Guest {guest.name} crashed on {socket.gethostname()}"
    assert alert["annotations"]["event"] == "lifecycle CRASHED/PANICKED"
    assert alert["status"]["state"] in ("active", "unprocessed")

    # The policy restarts the guest after restart_delay = 1 s; STARTED resolves the alert
    # (endsAt = the STARTED event's time: min_firing_duration = 0), so Alertmanager stops listing it.
    wait_until(lambda: not [a for a in am.alerts(alertname="VirtwatchGuestCrashed", domain=guest.name)
                            if a["startsAt"] == alert["startsAt"]], 30,
               "VirtwatchGuestCrashed resolved", interval=0.05, detail=stack.diag)
    started = [e for e in stack.events(guest.name)
               if e["kind"] == "lifecycle" and e["event"] == "STARTED" and e["time"] > crash["time"]]
    assert started, stack.events(guest.name)
    assert started[0]["time"] - crash["time"] >= 1.0  # restart_delay
    assert stack.metric("libvirt_domain_restarts_total", domain=guest.name, reason="crash") >= 1
    assert stack.metric("virtwatch_alerts_sent_total", alertmanager=am.url) >= 2  # fire + resolve


def test_crash_loop_fires_the_shipped_crash_and_restart_rules(stack: Stack, guests: Guests) -> None:
    # The policy guest panics again 4 s after each restart; a second crash and restart make the
    # counters increase inside Prometheus' window (the first ones only created the series).
    guest = guests.crashing
    vw_instance = f"127.0.0.1:{stack.vw.port}"
    wait_until(lambda: (stack.metric("libvirt_domain_restarts_total", domain=guest.name) or 0) >= 2, 90,
               "second restart by the policy", detail=stack.diag)
    [events] = wait_until(lambda: stack.prom_alerts("LibvirtGuestCrashEvents", instance=vw_instance), 15,
                          "LibvirtGuestCrashEvents firing", detail=stack.diag)
    assert events["labels"] == {"alertname": "LibvirtGuestCrashEvents", "severity": "critical",
                                "instance": vw_instance, "job": "virtwatch"}
    assert float(events["value"]) > 0
    restarted = wait_until(lambda: stack.prom_alerts("LibvirtGuestRestarted", domain=guest.name), 15,
                           "LibvirtGuestRestarted firing", detail=stack.diag)
    assert [(a["labels"]["reason"], a["labels"]["severity"]) for a in restarted] == [("crash", "warning")]
    # Every crash of the loop reached Alertmanager as its own instant alert (one startsAt each).
    assert len(stack.watcher.first_seen("VirtwatchGuestCrashed", guest.name)) >= 2
    # Stop the crash loop: an admin destroy leaves the guest stopped.
    guest.dom.destroy()
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


def test_alerts_queued_while_alertmanager_is_down_arrive_after_it_is_back(
        stack: Stack, factory: GuestFactory) -> None:
    am, vw = stack.am, stack.vw
    am.stop()
    # Counted once Alertmanager is gone. Any POST accepted between reading the baseline and its
    # exit counted as "sent" (8 == 7 once in CI): this daemon alerts on every guest of the host,
    # other e2e sessions' crashing guests included, and re-posts firing alerts every 60 s (the
    # crash-loop guest's, if the previous test destroyed it while crashed).
    failed0 = stack.metric("virtwatch_alerts_failed_total", alertmanager=am.url) or 0.0
    sent0 = stack.metric("virtwatch_alerts_sent_total", alertmanager=am.url) or 0.0
    try:
        # Unmanaged guest kept in the crashed state (on_crash=preserve): its alert stays firing.
        guest = factory.create("alcrash", options={"panic": 1}, on_crash="preserve", wait=False)
        guest.wait_for_state(libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED, timeout=60)
        crash = wait_until(lambda: next((e for e in stack.events(guest.name)
                                         if e["kind"] == "lifecycle" and e["event"] == "CRASHED"), None), 10,
                           "CRASHED event in virtwatch")
        wait_until(lambda: (stack.metric("virtwatch_alerts_failed_total", alertmanager=am.url) or 0) >= failed0 + 2,
                   10, "failed POSTs counted while Alertmanager is down", detail=stack.diag)
        assert stack.metric("virtwatch_alerts_queue_length", alertmanager=am.url) >= 1
        assert stack.metric("virtwatch_alerts_sent_total", alertmanager=am.url) == sent0
        # Prometheus sees the crashed state too (LibvirtGuestCrashed: state code 6).
        wait_until(lambda: stack.prom_alerts("LibvirtGuestCrashed", domain=guest.name), 10,
                   "LibvirtGuestCrashed firing in Prometheus", detail=stack.diag)
        time.sleep(2)  # keep Alertmanager down a little longer: retries keep failing, nothing is lost
    finally:
        am.start()
    # (instance: not the rule twin Prometheus sends for the crashed state, instance 127.0.0.1:PORT)
    [alert] = wait_until(lambda: am.alerts(alertname="VirtwatchGuestCrashed", domain=guest.name,
                                           instance=socket.gethostname()), 10,
                         "queued VirtwatchGuestCrashed delivered after the outage", interval=0.05, detail=stack.diag)
    assert alert["labels"] == {"alertname": "VirtwatchGuestCrashed", "severity": "critical", "domain": guest.name,
                               "uuid": guest.dom.UUIDString(), "instance": socket.gethostname()}
    assert abs(am_time(alert["startsAt"]) - crash["time"]) < 0.002  # the queued alert, from the event's time
    wait_until(lambda: stack.metric("virtwatch_alerts_queue_length", alertmanager=am.url) == 0, 10, "queue drained")
    assert stack.metric("virtwatch_alerts_sent_total", alertmanager=am.url) > sent0
    assert stack.metric("virtwatch_alerts_dropped_total", alertmanager=am.url, reason="queue_full") is None
    # Prometheus re-sends its firing alerts to the restarted Alertmanager as well.
    [from_prom] = wait_until(lambda: am.alerts(alertname="LibvirtGuestCrashed", domain=guest.name), 10,
                             "LibvirtGuestCrashed (from Prometheus) in Alertmanager", detail=stack.diag)
    assert from_prom["labels"]["severity"] == "critical"
    assert from_prom["labels"]["instance"] == f"127.0.0.1:{vw.port}"
