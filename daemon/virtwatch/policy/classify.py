"""Classification of lifecycle transitions: why did a guest stop, pause or start?

Pure and table-driven. Input: one event (kind, event, detail) plus the context
the engine tracks per guest: the detail of the ``SHUTDOWN`` event that preceded
a stop (``GUEST``/``HOST``/``FINISHED``), a watchdog action seen just before,
whether one of virtwatch's own operations is in flight (its tag), and whether
the host is shutting down. Output: a :class:`Classification`.

Facts recorded on libvirt 9.0 / QEMU 7.2 (tests/fixtures):

- guest panic (pvpanic, ``<on_crash>destroy``): CRASHED/PANICKED, STOPPED/CRASHED
- guest ``poweroff``: SHUTDOWN/GUEST, STOPPED/SHUTDOWN
- ``virsh destroy``: SHUTDOWN/HOST, STOPPED/DESTROYED (classify on the STOPPED detail)
- QEMU killed with SIGTERM: SHUTDOWN/HOST, STOPPED/SHUTDOWN; SIGKILL: STOPPED/FAILED
- ``virsh managedsave``: SUSPENDED/PAUSED, STOPPED/SAVED; restore: STARTED/RESTORED
- disk full with ``error_policy='stop'``: io_error ``enospc`` then SUSPENDED/IOERROR
- live migration, source: SUSPENDED/MIGRATED, STOPPED/MIGRATED; destination: STARTED/MIGRATED
  (the incoming copy, paused) then RESUMED/MIGRATED; aborted or refused: the destination's copy
  gets STOPPED/FAILED and the source no event at all (tests/e2e/test_migration.py)
"""

from __future__ import annotations

import dataclasses
import enum

from ..model import DomainState, Kind, Lifecycle, PausedReason, ShutoffReason


class StopCause(enum.StrEnum):
    """Why a guest stopped, paused or crashed (also the ``reason`` label of restart metrics)."""

    CRASH = "crash"                    # guest kernel crash / panic
    QEMU_FAILURE = "qemu_failure"      # QEMU process died (SIGKILL, OOM killer, assertion)
    HOST_KILL = "host_kill"            # QEMU terminated from the host, not by libvirt's destroy
    GUEST_POWEROFF = "guest_poweroff"  # the guest powered itself off (or an ACPI shutdown it obeyed)
    ADMIN_DESTROY = "admin_destroy"    # virDomainDestroy by someone else
    SAVED = "saved"                    # managed save / save by someone else
    MIGRATED = "migrated"              # migrated away
    MIGRATION_FAILED = "migration_failed"  # the incoming copy of a failed migration stopped (guest stays on the source)
    SNAPSHOT = "snapshot"              # reverted to / stopped by a snapshot
    OURS = "ours"                      # caused by virtwatch's own in-flight operation
    HOST_SHUTDOWN = "host_shutdown"    # the host is shutting down
    IO_ERROR = "io_error"              # paused on an I/O error
    WATCHDOG = "watchdog"              # watchdog fired (pause, or poweroff/shutdown)
    API_ERROR = "api_error"            # paused after a failed libvirt API (e.g. a failed resume)
    USER_PAUSE = "user_pause"          # paused by an admin (virsh suspend)
    TRANSIENT_PAUSE = "transient_pause"  # migration, save, dump, snapshot, starting up...
    PM_SUSPEND = "pm_suspend"          # guest suspended itself (S3/S4)
    UNKNOWN = "unknown"                # a stop libvirt gives no reason for
    # liveness failures (issue 12): the guest still runs, libvirt reports nothing
    PROBE_FAILED = "probe_failed"      # probe_failure_threshold consecutive failed probes
    CONSOLE_PANIC = "console_panic"    # a console_failure_patterns line on the captured console
    REBOOT_LOOP = "reboot_loop"        # more than reboot_limit guest reboots within reboot_interval
    HUNG = "hung"                      # vCPU time pegged, no block or network I/O for hang_after


#: The causes a liveness detector reports (:mod:`virtwatch.liveness`); on_probe_failure reacts.
LIVENESS_CAUSES = frozenset({StopCause.PROBE_FAILED, StopCause.CONSOLE_PANIC, StopCause.REBOOT_LOOP, StopCause.HUNG})


class Transition(enum.StrEnum):
    """What happened to the guest's run state."""

    STOPPED = "stopped"
    PAUSED = "paused"
    CRASHED = "crashed"          # in libvirt's CRASHED state (on_crash=preserve) or crash noted
    STARTED = "started"
    RESUMED = "resumed"
    MIGRATING_IN = "migrating_in"  # STARTED/MIGRATED: an incoming copy, paused; the guest still runs on the source
    MIGRATED_IN = "migrated_in"    # RESUMED/MIGRATED after STARTED/MIGRATED: the guest now runs here
    SHUTTING_DOWN = "shutting_down"  # SHUTDOWN/* pre-event: remember its detail
    NOTE = "note"                # io_error / watchdog event: remember, the lifecycle event follows
    UNHEALTHY = "unhealthy"      # still running, but a liveness detector declared it failed
    NONE = "none"                # nothing relevant (defined, undefined, agent...)


@dataclasses.dataclass(frozen=True, slots=True)
class ClassifyInput:
    """Everything classification looks at.

    Attributes:
        kind: event kind (``lifecycle``, ``io_error``, ``watchdog``...).
        event: e.g. ``STOPPED``; detail: e.g. ``CRASHED`` (I/O error: reason; watchdog: action).
        prev_shutdown: detail of the SHUTDOWN event that preceded this one (``GUEST``,
            ``HOST``, ``FINISHED``) or None.
        watchdog_action: action of a watchdog event seen just before (``PAUSE``,
            ``POWEROFF``...) or None.
        ours: tag of virtwatch's own operation in flight (``destroy``, ``start``...) or None.
        host_shutdown: True while the host is shutting down.
        migrating_in: the guest is the incoming copy of a migration (``STARTED/MIGRATED`` seen,
            not yet ``RESUMED/MIGRATED``).
    """

    kind: str
    event: str
    detail: str
    prev_shutdown: str | None = None
    watchdog_action: str | None = None
    ours: str | None = None
    host_shutdown: bool = False
    migrating_in: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Classification:
    """Result: the transition, its cause (None for starts/resumes/notes) and a short note."""

    transition: Transition
    cause: StopCause | None = None
    note: str = ""

    @property
    def is_stop(self) -> bool:
        """True for transitions that leave the guest not running (stopped, paused, crashed)."""
        return self.transition in (Transition.STOPPED, Transition.PAUSED, Transition.CRASHED)


#: Our operations that stop or pause a guest: their stop events are ours.
STOPPING_OPS = frozenset({"destroy", "kill", "managedsave", "shutdown", "restart"})

#: lifecycle STOPPED detail -> cause (SHUTDOWN is resolved by the preceding SHUTDOWN detail).
STOPPED_TABLE: dict[str, StopCause] = {
    "CRASHED": StopCause.CRASH,
    "FAILED": StopCause.QEMU_FAILURE,
    "DESTROYED": StopCause.ADMIN_DESTROY,
    "SAVED": StopCause.SAVED,
    "MIGRATED": StopCause.MIGRATED,
    "FROM_SNAPSHOT": StopCause.SNAPSHOT,
}

#: lifecycle SUSPENDED detail -> cause.
SUSPENDED_TABLE: dict[str, StopCause] = {
    "IOERROR": StopCause.IO_ERROR,
    "WATCHDOG": StopCause.WATCHDOG,
    "API_ERROR": StopCause.API_ERROR,
    "PAUSED": StopCause.USER_PAUSE,
    "MIGRATED": StopCause.TRANSIENT_PAUSE,
    "RESTORED": StopCause.TRANSIENT_PAUSE,
    "FROM_SNAPSHOT": StopCause.TRANSIENT_PAUSE,
    "POSTCOPY": StopCause.TRANSIENT_PAUSE,
    "POSTCOPY_FAILED": StopCause.TRANSIENT_PAUSE,
}

#: Watchdog actions that stop the guest (the STOPPED that follows is the watchdog's doing).
WATCHDOG_STOP_ACTIONS = frozenset({"POWEROFF", "SHUTDOWN"})


def _stopped_shutdown(inp: ClassifyInput) -> Classification:
    if inp.watchdog_action in WATCHDOG_STOP_ACTIONS:
        return Classification(Transition.STOPPED, StopCause.WATCHDOG, f"watchdog {inp.watchdog_action.lower()}")
    if inp.prev_shutdown == "HOST":
        return Classification(Transition.STOPPED, StopCause.HOST_KILL, "QEMU terminated from the host (SHUTDOWN/HOST)")
    if inp.prev_shutdown == "GUEST":
        return Classification(Transition.STOPPED, StopCause.GUEST_POWEROFF, "guest powered off (SHUTDOWN/GUEST)")
    return Classification(
        Transition.STOPPED, StopCause.GUEST_POWEROFF, "orderly shutdown, initiator unknown: treated as guest poweroff"
    )


def classify(inp: ClassifyInput) -> Classification:
    """Classify one event in its context. Pure; never raises."""
    if inp.kind == Kind.IO_ERROR:
        return Classification(Transition.NOTE, StopCause.IO_ERROR, f"I/O error {inp.detail}")
    if inp.kind == Kind.WATCHDOG:
        return Classification(Transition.NOTE, StopCause.WATCHDOG, f"watchdog action {inp.detail}")
    if inp.kind != Kind.LIFECYCLE:
        return Classification(Transition.NONE)
    ev, det = inp.event, inp.detail
    if ev == Lifecycle.SHUTDOWN:
        return Classification(Transition.SHUTTING_DOWN, None, f"shutdown initiated ({det})")
    if ev == Lifecycle.STARTED and det == "MIGRATED":
        return Classification(Transition.MIGRATING_IN, None, "incoming migration started")
    if inp.migrating_in and ev == Lifecycle.RESUMED and det == "MIGRATED":
        return Classification(Transition.MIGRATED_IN, None, "migration in complete")
    if inp.migrating_in and ev in (Lifecycle.STOPPED, Lifecycle.CRASHED):
        return Classification(Transition.STOPPED, StopCause.MIGRATION_FAILED,
                              f"incoming migration failed ({ev}/{det}): the guest stays on the source")
    if ev == Lifecycle.STARTED:
        return Classification(Transition.STARTED, None, det.lower())
    if ev == Lifecycle.RESUMED:
        return Classification(Transition.RESUMED, None, det.lower())
    if ev in (Lifecycle.DEFINED, Lifecycle.UNDEFINED):
        return Classification(Transition.NONE, None, f"{ev.lower()} {det.lower()}")
    if ev == Lifecycle.PMSUSPENDED:
        return Classification(Transition.PAUSED, StopCause.PM_SUSPEND, f"guest power management {det.lower()}")
    if ev == Lifecycle.CRASHED:
        if det == "CRASHLOADED":
            return Classification(Transition.NONE, None, "crash kernel loaded (kdump); the guest handles it")
        if inp.ours in STOPPING_OPS:
            return Classification(Transition.CRASHED, StopCause.OURS, f"during our {inp.ours}")
        if inp.host_shutdown:
            return Classification(Transition.CRASHED, StopCause.HOST_SHUTDOWN, "crash while the host shuts down")
        return Classification(Transition.CRASHED, StopCause.CRASH, f"guest {det.lower()}")
    if ev not in (Lifecycle.STOPPED, Lifecycle.SUSPENDED):
        return Classification(Transition.NONE, None, f"{ev.lower()} {det.lower()}")
    transition = Transition.STOPPED if ev == Lifecycle.STOPPED else Transition.PAUSED
    if inp.ours in STOPPING_OPS:
        return Classification(transition, StopCause.OURS, f"caused by our {inp.ours}")
    if inp.host_shutdown:
        return Classification(transition, StopCause.HOST_SHUTDOWN, "host is shutting down")
    if ev == Lifecycle.STOPPED:
        if det == "SHUTDOWN":
            return _stopped_shutdown(inp)
        cause = STOPPED_TABLE.get(det, StopCause.UNKNOWN)
        return Classification(transition, cause, f"STOPPED/{det}")
    cause = SUSPENDED_TABLE.get(det, StopCause.TRANSIENT_PAUSE)
    return Classification(transition, cause, f"SUSPENDED/{det}")


#: ``virDomainShutoffReason`` -> cause, for state seen at resync (events were missed).
SHUTOFF_REASON_TABLE: dict[int, StopCause] = {
    ShutoffReason.UNKNOWN: StopCause.UNKNOWN,
    ShutoffReason.SHUTDOWN: StopCause.GUEST_POWEROFF,  # initiator unknowable now: never fight the operator
    ShutoffReason.DESTROYED: StopCause.ADMIN_DESTROY,
    ShutoffReason.CRASHED: StopCause.CRASH,
    ShutoffReason.MIGRATED: StopCause.MIGRATED,
    ShutoffReason.SAVED: StopCause.SAVED,
    ShutoffReason.FAILED: StopCause.QEMU_FAILURE,
    ShutoffReason.FROM_SNAPSHOT: StopCause.SNAPSHOT,
    ShutoffReason.DAEMON: StopCause.QEMU_FAILURE,  # libvirtd found QEMU gone at its restart
}

#: ``virDomainPausedReason`` -> cause, for state seen at resync.
PAUSED_REASON_TABLE: dict[int, StopCause] = {
    PausedReason.USER: StopCause.USER_PAUSE,
    PausedReason.IOERROR: StopCause.IO_ERROR,
    PausedReason.WATCHDOG: StopCause.WATCHDOG,
    PausedReason.API_ERROR: StopCause.API_ERROR,
    PausedReason.CRASHED: StopCause.CRASH,
}


def classify_state(state: int, reason: int) -> Classification:
    """Classify a guest's current ``(state, reason)`` (after a resync, when events were lost). Pure."""
    if state == DomainState.SHUTOFF:
        cause = SHUTOFF_REASON_TABLE.get(reason, StopCause.UNKNOWN)
        return Classification(
            Transition.STOPPED,
            cause,
            f"shut off, reason {ShutoffReason(reason).name if reason in ShutoffReason._value2member_map_ else reason}",
        )
    if state == DomainState.CRASHED:
        return Classification(Transition.CRASHED, StopCause.CRASH, "in crashed state")
    if state == DomainState.PAUSED:
        cause = PAUSED_REASON_TABLE.get(reason, StopCause.TRANSIENT_PAUSE)
        return Classification(Transition.PAUSED, cause, f"paused, reason {reason}")
    if state == DomainState.PMSUSPENDED:
        return Classification(Transition.PAUSED, StopCause.PM_SUSPEND, "pm-suspended")
    if state in (DomainState.RUNNING, DomainState.BLOCKED, DomainState.SHUTDOWN):
        return Classification(Transition.STARTED, None, "running")
    return Classification(Transition.NONE, None, "no state")
