"""Classification table: one test per row, plus the recorded real sequences."""

import json
from pathlib import Path

import pytest

from virtwatch.model import DomainState, PausedReason, ShutoffReason, is_guest_failure as guest_failure
from virtwatch.policy.classify import ClassifyInput, StopCause, Transition, classify, classify_state

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "events-libvirt9-qemu7.2.jsonl"

L = "lifecycle"
ROWS = [
    # (kind, event, detail, prev_shutdown, watchdog, ours, host_shutdown) -> (transition, cause)
    ((L, "STOPPED", "CRASHED", None, None, None, False), (Transition.STOPPED, StopCause.CRASH)),
    ((L, "STOPPED", "FAILED", None, None, None, False), (Transition.STOPPED, StopCause.QEMU_FAILURE)),
    ((L, "STOPPED", "SHUTDOWN", "HOST", None, None, False), (Transition.STOPPED, StopCause.HOST_KILL)),
    ((L, "STOPPED", "SHUTDOWN", "GUEST", None, None, False), (Transition.STOPPED, StopCause.GUEST_POWEROFF)),
    ((L, "STOPPED", "SHUTDOWN", None, None, None, False), (Transition.STOPPED, StopCause.GUEST_POWEROFF)),
    ((L, "STOPPED", "SHUTDOWN", "FINISHED", None, None, False), (Transition.STOPPED, StopCause.GUEST_POWEROFF)),
    ((L, "STOPPED", "SHUTDOWN", "GUEST", "POWEROFF", None, False), (Transition.STOPPED, StopCause.WATCHDOG)),
    ((L, "STOPPED", "DESTROYED", "HOST", None, None, False), (Transition.STOPPED, StopCause.ADMIN_DESTROY)),
    ((L, "STOPPED", "DESTROYED", None, None, None, False), (Transition.STOPPED, StopCause.ADMIN_DESTROY)),
    ((L, "STOPPED", "SAVED", None, None, None, False), (Transition.STOPPED, StopCause.SAVED)),
    ((L, "STOPPED", "MIGRATED", None, None, None, False), (Transition.STOPPED, StopCause.MIGRATED)),
    ((L, "STOPPED", "FROM_SNAPSHOT", None, None, None, False), (Transition.STOPPED, StopCause.SNAPSHOT)),
    ((L, "STOPPED", "SOMETHING_NEW", None, None, None, False), (Transition.STOPPED, StopCause.UNKNOWN)),
    ((L, "STOPPED", "DESTROYED", "HOST", None, "destroy", False), (Transition.STOPPED, StopCause.OURS)),
    ((L, "STOPPED", "SAVED", None, None, "managedsave", False), (Transition.STOPPED, StopCause.OURS)),
    ((L, "STOPPED", "CRASHED", None, None, "start", False), (Transition.STOPPED, StopCause.CRASH)),
    ((L, "STOPPED", "SHUTDOWN", "HOST", None, None, True), (Transition.STOPPED, StopCause.HOST_SHUTDOWN)),
    ((L, "STOPPED", "DESTROYED", "HOST", None, "destroy", True), (Transition.STOPPED, StopCause.OURS)),
    ((L, "CRASHED", "PANICKED", None, None, None, False), (Transition.CRASHED, StopCause.CRASH)),
    ((L, "CRASHED", "PANICKED", None, None, None, True), (Transition.CRASHED, StopCause.HOST_SHUTDOWN)),
    ((L, "CRASHED", "PANICKED", None, None, "kill", False), (Transition.CRASHED, StopCause.OURS)),
    ((L, "CRASHED", "CRASHLOADED", None, None, None, False), (Transition.NONE, None)),
    ((L, "SUSPENDED", "IOERROR", None, None, None, False), (Transition.PAUSED, StopCause.IO_ERROR)),
    ((L, "SUSPENDED", "WATCHDOG", None, None, None, False), (Transition.PAUSED, StopCause.WATCHDOG)),
    ((L, "SUSPENDED", "API_ERROR", None, None, None, False), (Transition.PAUSED, StopCause.API_ERROR)),
    ((L, "SUSPENDED", "PAUSED", None, None, None, False), (Transition.PAUSED, StopCause.USER_PAUSE)),
    ((L, "SUSPENDED", "PAUSED", None, None, "managedsave", False), (Transition.PAUSED, StopCause.OURS)),
    ((L, "SUSPENDED", "MIGRATED", None, None, None, False), (Transition.PAUSED, StopCause.TRANSIENT_PAUSE)),
    ((L, "SUSPENDED", "POSTCOPY_FAILED", None, None, None, False), (Transition.PAUSED, StopCause.TRANSIENT_PAUSE)),
    ((L, "PMSUSPENDED", "MEMORY", None, None, None, False), (Transition.PAUSED, StopCause.PM_SUSPEND)),
    ((L, "SHUTDOWN", "HOST", None, None, None, False), (Transition.SHUTTING_DOWN, None)),
    ((L, "SHUTDOWN", "GUEST", None, None, None, False), (Transition.SHUTTING_DOWN, None)),
    ((L, "STARTED", "BOOTED", None, None, None, False), (Transition.STARTED, None)),
    ((L, "STARTED", "RESTORED", None, None, None, False), (Transition.STARTED, None)),
    ((L, "RESUMED", "UNPAUSED", None, None, None, False), (Transition.RESUMED, None)),
    ((L, "DEFINED", "ADDED", None, None, None, False), (Transition.NONE, None)),
    ((L, "UNDEFINED", "REMOVED", None, None, None, False), (Transition.NONE, None)),
    (("io_error", "IO_ERROR", "enospc", None, None, None, False), (Transition.NOTE, StopCause.IO_ERROR)),
    (("watchdog", "WATCHDOG", "PAUSE", None, None, None, False), (Transition.NOTE, StopCause.WATCHDOG)),
    (("agent_lifecycle", "CONNECTED", "CHANNEL", None, None, None, False), (Transition.NONE, None)),
]


@pytest.mark.parametrize(
    "inp, expected", ROWS, ids=[f"{r[0][1]}/{r[0][2]}/{r[0][3]}/{r[0][4]}/{r[0][5]}/{r[0][6]}" for r in ROWS]
)
def test_table_row(inp, expected):
    c = classify(ClassifyInput(*inp))
    assert (c.transition, c.cause) == expected


def _replay(lines):
    """Classify recorded events per guest, tracking the preceding SHUTDOWN detail as the engine does."""
    prev: dict[str, str | None] = {}
    out: dict[str, list[tuple[str, str | None]]] = {}
    for rec in lines:
        dom = rec["domain"]
        if rec["kind"] == "io_error":
            c = classify(ClassifyInput("io_error", "IO_ERROR", rec["reason"]))
        else:
            c = classify(ClassifyInput("lifecycle", rec["event"], rec["detail"], prev.get(dom)))
            if c.transition == Transition.SHUTTING_DOWN:
                prev[dom] = rec["detail"]
            elif c.transition in (Transition.STARTED, Transition.STOPPED):
                prev[dom] = None
        if c.cause is not None:
            out.setdefault(dom, []).append((c.transition.value, c.cause.value))
    return out


def test_recorded_real_sequences():
    lines = [json.loads(x) for x in FIXTURES.read_text().splitlines() if x.strip()]
    got = _replay(lines)
    assert got["ev-panic"] == [("crashed", "crash"), ("stopped", "crash")]
    assert got["ev-poweroff"] == [("stopped", "guest_poweroff")]
    assert got["ev-destroy"] == [("stopped", "admin_destroy")]
    assert got["ev-save"] == [
        ("paused", "user_pause"),
        ("paused", "user_pause"),
        ("stopped", "saved"),
        ("stopped", "admin_destroy"),
        ("stopped", "admin_destroy"),
    ]
    assert got["ioerr"] == [("stopped", "admin_destroy"), ("note", "io_error"), ("paused", "io_error")]
    assert "ev-wd" not in got


def test_sigterm_kill_sequence_is_host_kill():
    seq = [("SHUTDOWN", "HOST"), ("STOPPED", "SHUTDOWN")]
    lines = [{"domain": "g", "kind": "lifecycle", "event": e, "detail": d} for e, d in seq]
    assert _replay(lines) == {"g": [("stopped", "host_kill")]}


def test_sigkill_is_qemu_failure():
    lines = [{"domain": "g", "kind": "lifecycle", "event": "STOPPED", "detail": "FAILED"}]
    assert _replay(lines) == {"g": [("stopped", "qemu_failure")]}


@pytest.mark.parametrize(
    "state, reason, expected",
    [
        (DomainState.SHUTOFF, ShutoffReason.CRASHED, (Transition.STOPPED, StopCause.CRASH)),
        (DomainState.SHUTOFF, ShutoffReason.FAILED, (Transition.STOPPED, StopCause.QEMU_FAILURE)),
        (DomainState.SHUTOFF, ShutoffReason.DAEMON, (Transition.STOPPED, StopCause.QEMU_FAILURE)),
        (DomainState.SHUTOFF, ShutoffReason.SHUTDOWN, (Transition.STOPPED, StopCause.GUEST_POWEROFF)),
        (DomainState.SHUTOFF, ShutoffReason.DESTROYED, (Transition.STOPPED, StopCause.ADMIN_DESTROY)),
        (DomainState.SHUTOFF, ShutoffReason.SAVED, (Transition.STOPPED, StopCause.SAVED)),
        (DomainState.SHUTOFF, ShutoffReason.UNKNOWN, (Transition.STOPPED, StopCause.UNKNOWN)),
        (DomainState.SHUTOFF, 99, (Transition.STOPPED, StopCause.UNKNOWN)),
        (DomainState.CRASHED, 1, (Transition.CRASHED, StopCause.CRASH)),
        (DomainState.PAUSED, PausedReason.IOERROR, (Transition.PAUSED, StopCause.IO_ERROR)),
        (DomainState.PAUSED, PausedReason.WATCHDOG, (Transition.PAUSED, StopCause.WATCHDOG)),
        (DomainState.PAUSED, PausedReason.API_ERROR, (Transition.PAUSED, StopCause.API_ERROR)),
        (DomainState.PAUSED, PausedReason.USER, (Transition.PAUSED, StopCause.USER_PAUSE)),
        (DomainState.PAUSED, PausedReason.MIGRATION, (Transition.PAUSED, StopCause.TRANSIENT_PAUSE)),
        (DomainState.RUNNING, 1, (Transition.STARTED, None)),
        (DomainState.PMSUSPENDED, 0, (Transition.PAUSED, StopCause.PM_SUSPEND)),
    ],
)
def test_state_table(state, reason, expected):
    c = classify_state(state, reason)
    assert (c.transition, c.cause) == expected


@pytest.mark.parametrize(
    "kind, event, detail, failure",
    [
        ("lifecycle", "CRASHED", "PANICKED", True),
        ("lifecycle", "CRASHED", "CRASHLOADED", True),
        ("lifecycle", "STOPPED", "CRASHED", True),
        ("lifecycle", "STOPPED", "FAILED", True),
        ("lifecycle", "SUSPENDED", "IOERROR", True),
        ("lifecycle", "SUSPENDED", "WATCHDOG", True),
        ("io_error", "IO_ERROR", "enospc", True),
        ("watchdog", "WATCHDOG", "pause", True),
        ("lifecycle", "STOPPED", "DESTROYED", False),
        ("lifecycle", "STOPPED", "SHUTDOWN", False),
        ("lifecycle", "STOPPED", "SAVED", False),
        ("lifecycle", "SUSPENDED", "PAUSED", False),
        ("lifecycle", "STARTED", "BOOTED", False),
        ("metadata_change", "METADATA_CHANGE", "ELEMENT", False),
    ],
)
def test_guest_failure_is_never_ours(kind, event, detail, failure):
    """A failure only the guest or QEMU causes is never attributed to our own in-flight operation."""
    assert guest_failure(kind, event, detail) is failure
