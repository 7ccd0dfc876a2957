"""The event vocabulary (virtwatch.model) against libvirt-python's own constants.

model.py never imports libvirt; these tests hold its mirrors to the real values, so a
libvirt that renumbers or adds something is noticed here.
"""

from __future__ import annotations

import libvirt
import pytest

from virtwatch.model import (
    ACTIVE,
    RUNNING,
    CrashedReason,
    DomainState,
    Event,
    Kind,
    Lifecycle,
    PausedReason,
    PMSuspendedReason,
    RunningReason,
    ShutoffReason,
    Source,
    is_crash,
    is_guest_failure,
    lifecycle_state,
    missed_lifecycle,
)
from virtwatch.virt.decode import DOMAIN_EVENTS, HOST_EVENTS, constant_names

ENUMS = [(DomainState, "VIR_DOMAIN_"), (RunningReason, "VIR_DOMAIN_RUNNING_"), (ShutoffReason, "VIR_DOMAIN_SHUTOFF_"),
         (PausedReason, "VIR_DOMAIN_PAUSED_"), (CrashedReason, "VIR_DOMAIN_CRASHED_"),
         (PMSuspendedReason, "VIR_DOMAIN_PMSUSPENDED_")]


@pytest.mark.parametrize(("enum_", "prefix"), ENUMS, ids=[e.__name__ for e, _ in ENUMS])
def test_state_and_reason_enums_are_libvirts_values(enum_, prefix: str) -> None:
    """Every member libvirt-python has is its value; members newer than this libvirt (9.0
    lacks PAUSED_API_ERROR, 14) are allowed, none of libvirt's may be missing."""
    # VIR_DOMAIN_ is every domain constant, and VIR_DOMAIN_PMSUSPENDED_DISK_* is another enum
    known = {} if enum_ in (DomainState, PMSuspendedReason) else constant_names(prefix)
    for member in enum_:
        if hasattr(libvirt, prefix + member.name):
            assert getattr(libvirt, prefix + member.name) == member.value, member
    assert set(known.values()) <= set(enum_.__members__), set(known.values()) - set(enum_.__members__)


def test_lifecycle_names_are_libvirts_event_types() -> None:
    codes = {getattr(libvirt, f"VIR_DOMAIN_EVENT_{m}") for m in Lifecycle}
    assert codes == set(range(libvirt.VIR_DOMAIN_EVENT_CRASHED + 1))  # all nine, nothing else


def test_kinds_and_sources_are_what_the_decoder_emits() -> None:
    assert {k.value for k in Kind} <= {spec.kind for spec in DOMAIN_EVENTS}
    assert {s.value for s in Source} == {"domain"} | {spec.source for spec in HOST_EVENTS}


# Reason names that differ between the lifecycle detail and the state reason (libvirt names
# them independently): detail -> reason.
RENAMED = {("SUSPENDED", "PAUSED"): "USER", ("SUSPENDED", "MIGRATED"): "MIGRATION",
           ("SUSPENDED", "RESTORED"): "FROM_SNAPSHOT"}


def test_lifecycle_state_for_every_detail_libvirt_has() -> None:
    """Every (event, detail) pair libvirt defines: the state is the event's, and the reason is
    the state reason of the same name (or of its renamed counterpart), 0 where none exists."""
    states = {"STARTED": "RUNNING", "SUSPENDED": "PAUSED", "RESUMED": "RUNNING", "STOPPED": "SHUTOFF",
              "PMSUSPENDED": "PMSUSPENDED", "CRASHED": "CRASHED"}
    seen = 0
    for event in Lifecycle:
        details = constant_names(f"VIR_DOMAIN_EVENT_{event}_").values()
        for detail in details:
            got = lifecycle_state(event, detail)
            if event not in states:
                assert got is None, (event, detail)
                continue
            state = states[event]
            reasons = {n: v for v, n in constant_names(f"VIR_DOMAIN_{state}_").items()}
            want_reason = reasons.get(RENAMED.get((event, detail), detail), 0)
            if got is not None and want_reason == 0 and got[1] != 0:  # a reason newer than this libvirt-python
                assert not hasattr(libvirt, f"VIR_DOMAIN_{state}_{detail}"), (event, detail)
                want_reason = got[1]
            assert got == (getattr(libvirt, f"VIR_DOMAIN_{state}"), want_reason), (event, detail)
            seen += 1
    assert seen >= 30  # libvirt 9.0 defines 36 such pairs


def ev(kind: str, event: str, detail: str = "", source: str = "domain") -> Event:
    return Event(time=0.0, seq=1, source=source, kind=kind, name="g", uuid="u", event=event, detail=detail)


@pytest.mark.parametrize(("e", "crash", "failure"), [
    (ev("lifecycle", "CRASHED", "PANICKED"), True, True),
    (ev("lifecycle", "STOPPED", "CRASHED"), True, True),
    (ev("lifecycle", "STOPPED", "FAILED"), True, True),
    (ev("lifecycle", "STOPPED", "DESTROYED"), False, False),
    (ev("lifecycle", "SUSPENDED", "IOERROR"), False, True),
    (ev("lifecycle", "SUSPENDED", "WATCHDOG"), False, True),
    (ev("lifecycle", "SUSPENDED", "PAUSED"), False, False),
    (ev("watchdog", "WATCHDOG", "PAUSE"), False, True),
    (ev("io_error", "IO_ERROR", "enospc"), False, True),
    (ev("network_lifecycle", "STOPPED", "", source="network"), False, False),
])
def test_crash_and_guest_failure_predicates(e: Event, crash: bool, failure: bool) -> None:
    assert is_crash(e) is crash
    assert is_guest_failure(e.kind, e.event, e.detail) is failure


def test_active_and_running_sets() -> None:
    # the agent is asked only while running; a console is read while QEMU exists
    assert {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED} == RUNNING
    assert RUNNING < ACTIVE
    assert libvirt.VIR_DOMAIN_PAUSED in ACTIVE and libvirt.VIR_DOMAIN_SHUTOFF not in ACTIVE
    assert libvirt.VIR_DOMAIN_NOSTATE not in ACTIVE


def test_enum_members_equal_their_plain_names() -> None:
    e = ev("lifecycle", "STOPPED", "CRASHED")
    assert e.event == Lifecycle.STOPPED and e.kind == Kind.LIFECYCLE and e.source == Source.DOMAIN
    assert e.is_lifecycle(Lifecycle.STOPPED) and not e.is_lifecycle(Lifecycle.STARTED)
    assert e.as_dict()["event"] == "STOPPED"


def test_missed_lifecycle_is_the_inverse_of_lifecycle_state() -> None:
    """For every state and reason libvirt defines, the event a resync stands in for leaves the
    guest in exactly that state and reason (BLOCKED reads back as RUNNING: no event blocks)."""
    checked = 0
    for state, reasons in [(DomainState.RUNNING, RunningReason), (DomainState.PAUSED, PausedReason),
                           (DomainState.SHUTOFF, ShutoffReason), (DomainState.CRASHED, CrashedReason),
                           (DomainState.PMSUSPENDED, PMSuspendedReason)]:
        for reason in reasons:
            missed = missed_lifecycle(state, reason)
            assert missed is not None, (state, reason)
            assert lifecycle_state(*missed) == (state, reason), (state, reason, missed)
            checked += 1
    assert checked == 39  # 12 running + 15 paused + 9 shutoff + 2 crashed + 1 pmsuspended reasons
    assert missed_lifecycle(DomainState.SHUTOFF, ShutoffReason.CRASHED) == ("STOPPED", "CRASHED")
    assert missed_lifecycle(DomainState.PAUSED, PausedReason.USER) == ("SUSPENDED", "PAUSED")
    assert missed_lifecycle(DomainState.PAUSED, PausedReason.IOERROR) == ("SUSPENDED", "IOERROR")
    assert missed_lifecycle(DomainState.RUNNING, RunningReason.UNPAUSED) == ("RESUMED", "UNPAUSED")
    assert missed_lifecycle(DomainState.CRASHED, CrashedReason.PANICKED) == ("CRASHED", "PANICKED")
    assert missed_lifecycle(DomainState.NOSTATE, 0) is None
    assert missed_lifecycle(DomainState.SHUTDOWN, 1) is None
    assert missed_lifecycle(DomainState.SHUTOFF, 99) == ("STOPPED", "UNKNOWN")
