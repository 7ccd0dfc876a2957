"""Event decoding and guest state, driven by real recorded event sequences."""

from __future__ import annotations

import libvirt
import pytest

from virtwatch.model import Event, ResyncEntry, lifecycle_state
from virtwatch.state import GuestRegistry
from virtwatch.virt import decode


def _event(seq: int, rec: dict, uuid: str | None = None) -> Event:
    ev, det = decode.lifecycle_names(*rec["raw"])
    return Event(time=rec["t"], seq=seq, source="domain", kind="lifecycle", name=rec["domain"],
                 uuid=uuid or f"uuid-{rec['domain']}", event=ev, detail=det, raw=tuple(rec["raw"]))


def test_lifecycle_codes_decode_to_the_recorded_names(recorded_events: list[dict]) -> None:
    lifecycle = [r for r in recorded_events if r["kind"] == "lifecycle"]
    assert len(lifecycle) > 30
    for rec in lifecycle:
        assert decode.lifecycle_names(*rec["raw"]) == (rec["event"], rec["detail"])


def test_unknown_codes_do_not_raise() -> None:
    assert decode.lifecycle_names(99, 7) == ("UNKNOWN_99", "")
    assert decode.lifecycle_names(5, 99) == ("STOPPED", "UNKNOWN_99")


@pytest.mark.parametrize("event,detail,expected", [
    ("STOPPED", "CRASHED", (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)),
    ("STOPPED", "DESTROYED", (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)),
    ("STOPPED", "SAVED", (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED)),
    ("SUSPENDED", "IOERROR", (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)),
    ("SUSPENDED", "WATCHDOG", (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_WATCHDOG)),
    ("SUSPENDED", "PAUSED", (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)),
    ("STARTED", "RESTORED", (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_RESTORED)),
    ("RESUMED", "UNPAUSED", (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)),
    ("CRASHED", "PANICKED", (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED)),
    ("SHUTDOWN", "GUEST", None),
    ("DEFINED", "ADDED", None),
])
def test_lifecycle_state(event: str, detail: str, expected: tuple | None) -> None:
    assert lifecycle_state(event, detail) == expected


def test_registry_follows_the_recorded_panic_and_save_sequences(recorded_events: list[dict]) -> None:
    reg = GuestRegistry(clock=lambda: 1000.0)
    for i, rec in enumerate(r for r in recorded_events if r["kind"] == "lifecycle"):
        reg.on_event(_event(i + 1, rec))
    panic = reg.by_name("ev-panic")
    assert (panic.state, panic.reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
    assert (panic.last_event, panic.last_detail) == ("STOPPED", "CRASHED")
    off = reg.by_name("ev-poweroff")
    assert (off.state, off.reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    saved = reg.by_name("ev-save")  # ends destroyed after a cold boot
    assert (saved.state, saved.reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert reg.by_name("ev-destroy") is None  # UNDEFINED/REMOVED while shut off: gone
    io = reg.by_name("ioerr")
    assert (io.state, io.reason) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
    wd = reg.by_name("ev-wd")
    assert (wd.state, wd.reason) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)


def test_resync_keeps_events_newer_than_the_read() -> None:
    reg = GuestRegistry(clock=lambda: 5.0)
    reg.apply_resync([ResyncEntry("a", "ua", 1, 1, True, False), ResyncEntry("b", "ub", 1, 1, True, True)],
                     started_after_seq=0)
    assert [g.name for g in reg.guests()] == ["a", "b"]
    assert reg.resynced_at == 5.0
    # event seq 7 arrives (a crashed) while a resync that started after seq 5 is in flight
    reg.on_event(Event(time=1, seq=7, source="domain", kind="lifecycle", name="a", uuid="ua", event="STOPPED",
                       detail="CRASHED"))
    reg.apply_resync([ResyncEntry("a", "ua", 1, 1, True, False)], started_after_seq=5)
    a = reg.get("ua")
    assert (a.state, a.reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
    assert reg.get("ub") is None  # b vanished and had no newer event
    # a later resync (after the event) wins
    reg.apply_resync([ResyncEntry("a", "ua", 1, 1, True, False)], started_after_seq=7)
    assert reg.get("ua").state == libvirt.VIR_DOMAIN_RUNNING


def test_transient_guest_disappears_when_stopped() -> None:
    reg = GuestRegistry()
    reg.apply_resync([ResyncEntry("t", "ut", 1, 1, False, False)], started_after_seq=0)
    reg.on_event(Event(time=1, seq=1, source="domain", kind="lifecycle", name="t", uuid="ut", event="STOPPED",
                       detail="DESTROYED"))
    assert reg.guests() == []


def test_agent_lifecycle_tracks_connection() -> None:
    reg = GuestRegistry()
    reg.apply_resync([ResyncEntry("g", "ug", 1, 1, True, False)], started_after_seq=0)
    v0 = reg.version
    reg.on_event(Event(time=1, seq=1, source="domain", kind="agent_lifecycle", name="g", uuid="ug",
                       event="CONNECTED", detail="CHANNEL"))
    assert reg.get("ug").agent_connected is True
    reg.on_event(Event(time=2, seq=2, source="domain", kind="agent_lifecycle", name="g", uuid="ug",
                       event="DISCONNECTED", detail="CHANNEL"))
    assert reg.get("ug").agent_connected is False
    assert reg.version == v0 + 2


def test_every_offered_domain_event_id_has_a_decoder() -> None:
    ids = {eid for eid, _ in decode.available_domain_events()}
    offered = {getattr(libvirt, n) for n in dir(libvirt)
               if n.startswith("VIR_DOMAIN_EVENT_ID_") and not n.endswith("LAST")}
    superseded = {libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB}
    assert offered - superseded == ids


def test_decoders_give_names_and_payload() -> None:
    specs = {s.kind: s for _, s in decode.available_domain_events()}
    assert specs["io_error"].decode("/img/a.qcow2", "virtio-disk0", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE,
                                    "enospc") == ("IO_ERROR", "enospc", {"src": "/img/a.qcow2",
                                                                         "dev": "virtio-disk0", "action": "PAUSE"})
    assert specs["watchdog"].decode(libvirt.VIR_DOMAIN_EVENT_WATCHDOG_RESET) == ("WATCHDOG", "RESET", {})
    assert specs["agent_lifecycle"].decode(
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED,
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_CHANNEL) == ("DISCONNECTED", "CHANNEL", {})
    assert specs["balloon_change"].decode(98304) == ("BALLOON_CHANGE", "", {"actual_bytes": 98304 * 1024})
    assert specs["block_job"].decode("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY,
                                     libvirt.VIR_DOMAIN_BLOCK_JOB_READY) == (
        "BLOCK_JOB", "READY", {"disk": "vda", "type": "COPY"})
    assert specs["graphics"].decode(libvirt.VIR_DOMAIN_EVENT_GRAPHICS_DISCONNECT, {"node": "1"}, {"node": "2"},
                                    "none", [("x509dname", "CN=a")])[1] == "DISCONNECT"


def test_state_names() -> None:
    assert decode.state_name(libvirt.VIR_DOMAIN_PAUSED) == "paused"
    assert decode.state_reason_name(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR) == "ioerror"
    assert decode.state_name(42) == "unknown_42"
