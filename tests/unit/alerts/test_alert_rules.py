"""The pure event → alert action rules."""

from __future__ import annotations

from virtwatch.alerts import rules
from virtwatch.alerts.rules import AlertAction, RuleContext, actions_for_event
from virtwatch.model import Event

T = 1795959293.731  # date -u -d @1795959293 -> 2026-11-29 13:34:53 UTC


def ev(kind: str, event: str, detail: str, name: str = "web1", payload=None, source: str = "domain") -> Event:
    return Event(time=T, seq=1, source=source, kind=kind, name=name, uuid="u-1", event=event, detail=detail,
                 payload=payload or {})


CTX = RuleContext(instance="hv1")


def test_crashed_panicked_fires_guest_crashed_with_labels_and_texts():
    [a] = actions_for_event(ev("lifecycle", "CRASHED", "PANICKED"), CTX)
    assert a == AlertAction(
        op="fire", alertname="VirtwatchGuestCrashed", domain="web1", uuid="u-1", severity="critical",
        summary="Guest web1 crashed on hv1",
        description="Guest web1 (uuid u-1) on hv1 crashed at 2026-11-29T13:34:53.731+00:00 "
                    "(lifecycle CRASHED/PANICKED).",
        annotations={"event": "lifecycle CRASHED/PANICKED"}, at=T,
    )


def test_stopped_crashed_also_fires_guest_crashed():
    [a] = actions_for_event(ev("lifecycle", "STOPPED", "CRASHED"), CTX)
    assert (a.op, a.alertname, a.annotations["event"]) == ("fire", "VirtwatchGuestCrashed", "lifecycle STOPPED/CRASHED")


def test_stopped_failed_fires_qemu_failed():
    [a] = actions_for_event(ev("lifecycle", "STOPPED", "FAILED"), CTX)
    assert (a.alertname, a.severity) == ("VirtwatchQemuFailed", "critical")
    assert "QEMU process failed" in a.description


def test_intended_stops_and_other_lifecycle_events_raise_nothing():
    for event, detail in [("STOPPED", "SHUTDOWN"), ("STOPPED", "DESTROYED"), ("STOPPED", "SAVED"),
                          ("SHUTDOWN", "GUEST"), ("SUSPENDED", "PAUSED"), ("DEFINED", "ADDED"),
                          ("UNDEFINED", "REMOVED")]:
        assert actions_for_event(ev("lifecycle", event, detail), CTX) == [], (event, detail)


def test_decision_and_console_become_annotations():
    ctx = RuleContext(instance="hv1", decision="restart in 5s, attempt 2/5", console="Kernel panic - not syncing")
    [a] = actions_for_event(ev("lifecycle", "CRASHED", "PANICKED"), ctx)
    assert a.annotations == {"event": "lifecycle CRASHED/PANICKED", "decision": "restart in 5s, attempt 2/5",
                             "console": "Kernel panic - not syncing"}
    assert a.description.endswith("Policy: restart in 5s, attempt 2/5.")


def test_io_error_carries_device_source_and_reason():
    # Shape of the recorded real event (tests/fixtures/events-libvirt9-qemu7.2.jsonl, guest "ioerr").
    e = ev("io_error", "IO_ERROR", "enospc", name="ioerr",
           payload={"src": "/var/lib/libvirt/images/small/io.qcow2", "dev": "virtio-disk0", "action": 1})
    [a] = actions_for_event(e, CTX)
    assert a.alertname == "VirtwatchGuestIOError"
    assert a.annotations == {"event": "io_error IO_ERROR/enospc",
                             "device": "virtio-disk0", "source": "/var/lib/libvirt/images/small/io.qcow2",
                             "reason": "enospc", "io_action": "1"}
    assert "device virtio-disk0 (/var/lib/libvirt/images/small/io.qcow2), reason enospc" in a.description


def test_suspended_ioerror_fires_only_when_io_alert_not_already_active():
    e = ev("lifecycle", "SUSPENDED", "IOERROR")
    [a] = actions_for_event(e, CTX)
    assert (a.op, a.alertname) == ("fire", "VirtwatchGuestIOError")
    active = RuleContext("hv1", active={("VirtwatchGuestIOError", "web1")})
    assert actions_for_event(e, active) == []


def test_watchdog_pause_fires_and_stays():
    [a] = actions_for_event(ev("watchdog", "WATCHDOG", "PAUSE"), CTX)
    assert (a.op, a.alertname, a.annotations["watchdog_action"]) == ("fire", "VirtwatchWatchdogFired", "PAUSE")


def test_watchdog_reset_fires_then_resolves_because_guest_keeps_running():
    acts = actions_for_event(ev("watchdog", "WATCHDOG", "RESET"), CTX)
    assert [(a.op, a.alertname) for a in acts] == [("fire", "VirtwatchWatchdogFired"),
                                                   ("resolve", "VirtwatchWatchdogFired")]


def test_running_again_resolves_only_active_guest_alerts_of_that_guest():
    active = {("VirtwatchGuestCrashed", "web1"), ("VirtwatchGuestIOError", "web1"), ("VirtwatchGivenUp", "web1"),
              ("VirtwatchGuestCrashed", "db1"), ("VirtwatchRestoreFailed", "web1")}
    ctx = RuleContext("hv1", active=active)
    for event, detail in [("STARTED", "BOOTED"), ("RESUMED", "UNPAUSED"), ("STARTED", "RESTORED")]:
        acts = actions_for_event(ev("lifecycle", event, detail), ctx)
        assert sorted((a.op, a.alertname, a.domain, a.at) for a in acts) == [
            ("resolve", "VirtwatchGuestCrashed", "web1", T),
            ("resolve", "VirtwatchGuestIOError", "web1", T),
            ("resolve", "VirtwatchRestoreFailed", "web1", T),
        ]
    assert actions_for_event(ev("lifecycle", "STARTED", "BOOTED"), CTX) == []


def test_non_domain_events_are_ignored():
    assert actions_for_event(ev("lifecycle", "STOPPED", "CRASHED", source="network"), CTX) == []
    assert actions_for_event(ev("agent_lifecycle", "DISCONNECTED", "CHANNEL"), CTX) == []


def test_builders_for_daemon_raised_alerts():
    g = rules.given_up("web1", "u-1", "hv1", "5 failures in 10m", decision="give up")
    assert (g.op, g.alertname, g.domain, g.severity) == ("fire", "VirtwatchGivenUp", "web1", "critical")
    assert g.annotations == {"reason": "5 failures in 10m", "decision": "give up"}
    assert "virtwatch reset" in g.description
    r = rules.restore_failed("web1", "u-1", "hv1", "image corrupt", decision="discard and boot")
    assert (r.alertname, r.annotations) == ("VirtwatchRestoreFailed",
                                             {"error": "image corrupt", "decision": "discard and boot"})
    c = rules.connection_lost("qemu:///system", "hv1", "keepalive timeout", at=5.0)
    assert (c.alertname, c.domain, c.key, c.at) == ("VirtwatchLibvirtConnectionLost", "", (
        "VirtwatchLibvirtConnectionLost", ""), 5.0)
    assert c.annotations == {"uri": "qemu:///system", "reason": "keepalive timeout"}
    assert rules.connection_restored() == AlertAction(op="resolve", alertname="VirtwatchLibvirtConnectionLost")
