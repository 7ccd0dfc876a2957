"""Pure policy decisions: (guest record, classified event, history, now, selection) -> :class:`Decision`.

No I/O, no clock, no randomness of its own (jitter comes in as ``rand``).
The engine carries decisions out and persists ``Decision.history`` and
``Decision.intent``. Also pure: what a resync does with a guest
(:func:`resync_step`), who the boot flow starts (:func:`boot_candidate`) and
what ``on_restore_failure`` does (:func:`restore_failure_plan`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

from ..model import ACTIVE, RUNNING, DomainState
from . import budget
from .budget import History
from .classify import LIVENESS_CAUSES, Classification, StopCause, Transition
from .config import GuestPolicy
from .select import Selection

Intent = Literal["running", "stopped", "held"]


class Action(enum.StrEnum):
    """What the engine should do."""

    NONE = "none"
    RESTART = "restart"   # (destroy if still active, then) start after ``delay``
    RESUME = "resume"     # resume a paused guest after ``delay``
    KILL = "kill"         # destroy now, restart after ``delay`` by budget
    RESET = "reset"       # virDomainReset a running guest after ``delay`` (on_probe_failure = reset)
    ALERT = "alert"       # only raise an alert
    GIVE_UP = "give_up"   # budget exhausted: alert, no more actions


@dataclasses.dataclass(frozen=True, slots=True)
class GuestRecord:
    """What the engine knows about a guest right now.

    ``state``/``reason`` are libvirt's codes as last seen; ``intent`` is the
    persisted intent.
    """

    name: str
    uuid: str
    state: int
    reason: int
    intent: Intent


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`.

    Attributes:
        action: what to do.
        delay: seconds from ``now`` before doing it (0 = at once).
        reason: one human line, e.g.
            ``"restart web1: crash, attempt 2/5, in 10 s, policy on_crash from profile critical"``.
        cause: the classified cause, if any.
        intent: the guest's intent after this event.
        history: the guest's history after this event (failure counted, retry scheduled...).
        alert: alert text when an alert should fire, else None.
        keep_pending: True when an already scheduled action must be kept (duplicate stop event).
        key: the policy key that decided (``on_crash``...), or "".
        migrated_to: the guest left this host by migration: its destination (``""``: not named);
            the engine stores it. None: no change.
    """

    action: Action
    delay: float
    reason: str
    cause: StopCause | None
    intent: Intent
    history: History
    alert: str | None = None
    keep_pending: bool = False
    key: str = ""
    migrated_to: str | None = None

    def message(self, mode: str) -> str:
        """The log line for ``mode``: dry-run and observe prefix acting decisions with "would"."""
        if self.action in (Action.NONE, Action.ALERT) or mode == "enforce":
            return self.reason
        return "would " + self.reason


#: cause -> the per-guest key that decides whether to restart.
REACTION_KEYS: dict[StopCause, str] = {
    StopCause.CRASH: "on_crash",
    StopCause.QEMU_FAILURE: "on_qemu_failure",
    StopCause.HOST_KILL: "on_host_kill",
    StopCause.GUEST_POWEROFF: "on_poweroff",
    StopCause.UNKNOWN: "on_poweroff",
    StopCause.ADMIN_DESTROY: "on_destroy",
    StopCause.WATCHDOG: "on_watchdog",
}

#: causes after which the guest is deliberately elsewhere or off: intent becomes stopped.
STOPPING_CAUSES = frozenset({StopCause.SAVED, StopCause.MIGRATED, StopCause.SNAPSHOT})

#: causes that need no reaction at all.
IGNORED_CAUSES = frozenset(
    {StopCause.OURS, StopCause.HOST_SHUTDOWN, StopCause.USER_PAUSE, StopCause.TRANSIENT_PAUSE, StopCause.PM_SUSPEND}
)


def initial_intent(policy: GuestPolicy, state: int) -> Intent:
    """Intent of a guest seen for the first time, from ``policy.intent`` and its state."""
    if policy.intent == "running":
        return "running"
    if policy.intent == "stopped":
        return "stopped"
    return "running" if state in ACTIVE else "stopped"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 or seconds == int(seconds) else f"{seconds:.1f} s"


def _restart(
    guest: GuestRecord,
    cls: Classification,
    history: History,
    now: float,
    sel: Selection,
    rand: float,
    key: str,
    kill: bool = False,
) -> Decision:
    cause = cls.cause or StopCause.UNKNOWN
    pol = sel.policy
    h = budget.record_failure(history, now, pol, cause.value)
    src = f"policy {key} from {sel.source(key)}"
    if h.given_up:
        text = (f"give up {guest.name}: {cause.value}, {h.given_up_reason}; "
                f"only 'virtwatch reset {guest.name}' re-enables it")
        return Decision(Action.GIVE_UP, 0.0, text, cause, "running", h, alert=text, key=key)
    delay = budget.backoff_delay(h.attempt, pol, rand)
    h = budget.schedule(h, now + delay)
    used = len(budget.window(h, now, pol))
    verb = "kill and restart" if kill else "restart"
    text = f"{verb} {guest.name}: {cause.value}, attempt {used}/{pol.limit_burst}, in {_fmt_s(delay)}, {src}"
    return Decision(Action.KILL if kill else Action.RESTART, delay, text, cause, "running", h, key=key)


def decide(
    guest: GuestRecord, event: Classification, history: History, now: float, policy: Selection, rand: float = 0.0
) -> Decision:
    """Decide what to do about one classified event. Pure.

    Args:
        guest: the guest as known before this event.
        event: its classification (:func:`virtwatch.policy.classify.classify`).
        history: restart history before this event.
        now: wall-clock seconds.
        policy: the guest's :class:`Selection` (merged policy + sources + mode).
        rand: a number in [0, 1) for the jitter.

    Returns:
        a :class:`Decision`; its ``history`` and ``intent`` are to be persisted
        whatever the mode (dry-run and observe only skip the action itself).
    """
    pol = policy.policy
    name = guest.name
    h = budget.record_stable(history, now, pol)
    intent: Intent = guest.intent
    tr, cause = event.transition, event.cause

    if tr == Transition.STARTED:
        new_intent: Intent = intent if intent == "held" else "running"
        return Decision(
            Action.NONE, 0.0, f"{name} started ({event.note})", None, new_intent, budget.record_start(h, now, pol)
        )
    if tr == Transition.RESUMED:
        return Decision(Action.NONE, 0.0, f"{name} resumed ({event.note})", None, intent, h, keep_pending=False)
    if tr in (Transition.MIGRATING_IN, Transition.MIGRATED_IN) or cause == StopCause.MIGRATION_FAILED:
        return _migration(guest, event, h, now, policy)
    if not event.is_stop or cause is None:
        return Decision(Action.NONE, 0.0, f"{name}: {event.note or tr.value}", cause, intent, h, keep_pending=True)

    if cause in IGNORED_CAUSES:
        return Decision(
            Action.NONE,
            0.0,
            f"{name} {tr.value}: {cause.value} ({event.note}), no action",
            cause,
            intent,
            h,
            keep_pending=cause == StopCause.OURS,
        )
    if cause in STOPPING_CAUSES:
        new = intent if intent == "held" else "stopped"
        if cause == StopCause.MIGRATED:
            return Decision(Action.NONE, 0.0, f"{name} migrated away: intent {new}, nothing to do here", cause,
                            new, h, migrated_to="")
        return Decision(Action.NONE, 0.0, f"{name} {tr.value}: {cause.value}, intent {new}", cause, new, h)
    if not policy.managed:
        return Decision(
            Action.NONE, 0.0, f"{name} {tr.value}: {cause.value}, not managed (observed only)", cause, intent, h
        )
    if intent == "held":
        return Decision(
            Action.NONE, 0.0, f"{name} {tr.value}: {cause.value}, held by operator: no action", cause, intent, h
        )
    if h.given_up:
        return Decision(
            Action.NONE, 0.0, f"{name} {tr.value}: {cause.value}, given up ({h.given_up_reason})", cause, intent, h
        )
    if h.next_retry is not None and tr != Transition.PAUSED:
        return Decision(
            Action.NONE,
            0.0,
            f"{name} {tr.value}: {cause.value}, retry already scheduled",
            cause,
            intent,
            h,
            keep_pending=True,
        )

    if cause == StopCause.API_ERROR:
        text = f"{name} paused after a libvirt API error: alert only"
        return Decision(Action.ALERT, 0.0, text, cause, intent, h, alert=text)
    if cause == StopCause.IO_ERROR:
        src = f"policy on_io_error from {policy.source('on_io_error')}"
        if intent != "running":
            return Decision(
                Action.NONE, 0.0, f"{name} paused on I/O error, intent {intent}: no action", cause, intent, h
            )
        if pol.on_io_error == "leave":
            text = f"{name} paused on an I/O error: left paused, {src}"
            return Decision(Action.ALERT, 0.0, text, cause, intent, h, alert=text, key="on_io_error")
        if pol.on_io_error == "resume":
            delay = budget.io_resume_delay(h.io_resumes, pol)
            text = f"resume {name}: I/O error, resume {h.io_resumes + 1}, in {_fmt_s(delay)}, {src}"
            return Decision(
                Action.RESUME, delay, text, cause, intent, budget.schedule(h, now + delay), key="on_io_error"
            )
        return _restart(guest, event, h, now, policy, rand, "on_io_error", kill=True)

    key = REACTION_KEYS.get(cause, "on_poweroff")
    reaction = getattr(pol, key)
    if reaction == "leave":
        src = f"policy {key} from {policy.source(key)}"
        failure = cause in (StopCause.CRASH, StopCause.QEMU_FAILURE, StopCause.HOST_KILL, StopCause.WATCHDOG)
        new = "stopped"
        if tr == Transition.PAUSED:
            text = f"{name} paused: {cause.value}: left alone, {src}"
            return Decision(Action.ALERT, 0.0, text, cause, intent, h, alert=text, key=key)
        text = f"{name} {tr.value}: {cause.value}: left alone, intent stopped, {src}"
        return Decision(
            Action.ALERT if failure else Action.NONE, 0.0, text, cause, new, h, alert=text if failure else None, key=key
        )
    if intent != "running":
        return Decision(
            Action.NONE, 0.0, f"{name} {tr.value}: {cause.value}, intent {intent}: no action", cause, intent, h
        )
    return _restart(guest, event, h, now, policy, rand, key)


def decide_liveness(
    guest: GuestRecord,
    cause: StopCause,
    detail: str,
    history: History,
    now: float,
    policy: Selection,
    *,
    busy: str | None = None,
    rand: float = 0.0,
) -> Decision:
    """Decide what to do about a liveness failure of a guest that still runs. Pure.

    Args:
        guest: the guest as known now (``state`` is libvirt's last state code).
        cause: one of :data:`~virtwatch.policy.classify.LIVENESS_CAUSES`.
        detail: what the detector saw (one line: the console line, the probe's error...).
        history: restart history.
        now: wall-clock seconds.
        policy: the guest's :class:`Selection`; ``on_probe_failure`` decides.
        busy: the libvirt job running on the guest (``migration``, ``save``...) or None:
            never act during one.
        rand: a number in [0, 1) for the jitter.

    ``leave`` (the default) is :attr:`Action.NONE` with the cause set: the detector's own
    instant alert is the alert, and the decision becomes its annotation. ``reset`` schedules
    :attr:`Action.RESET` and ``restart`` :attr:`Action.KILL` (destroy now, start after the
    backoff delay), both counted against the restart budget like a crash.
    """
    if cause not in LIVENESS_CAUSES:
        raise ValueError(f"not a liveness cause: {cause}")
    name = guest.name
    h = budget.record_stable(history, now, policy.policy)
    what = f"{name} unhealthy: {cause.value} ({detail})" if detail else f"{name} unhealthy: {cause.value}"

    def none(why: str, keep: bool = False) -> Decision:
        return Decision(Action.NONE, 0.0, f"{what}, {why}", cause, guest.intent, h, keep_pending=keep)

    if not policy.managed:
        return none("not managed (observed only)")
    if guest.intent == "held":
        return none("held by operator: no action")
    if busy:
        return none(f"{busy} job in progress: no action")
    if guest.state not in RUNNING:
        return none("not running any more: its lifecycle event decides")
    if h.given_up:
        return none(f"given up ({h.given_up_reason})")
    if h.next_retry is not None:
        return none("action already scheduled", keep=True)
    if guest.intent != "running":
        return none(f"intent {guest.intent}: no action")
    key = "on_probe_failure"
    reaction = policy.policy.on_probe_failure
    src = f"policy {key} from {policy.source(key)}"
    if reaction == "leave":
        return Decision(Action.NONE, 0.0, f"{what}: left alone, {src}", cause, guest.intent, h, key=key)
    cls = Classification(Transition.UNHEALTHY, cause, detail)
    if reaction == "restart":
        return _restart(guest, cls, h, now, policy, rand, key, kill=True)
    d = _restart(guest, cls, h, now, policy, rand, key)
    if d.action != Action.RESTART:
        return d  # given up
    return dataclasses.replace(d, action=Action.RESET, reason="reset" + d.reason.removeprefix("restart"))


def _migration(guest: GuestRecord, event: Classification, h: History, now: float, policy: Selection) -> Decision:
    """The destination's side of a migration: the incoming copy appears, is adopted, or fails."""
    if event.transition == Transition.MIGRATED_IN:
        return decide_migrated_in(guest, h, now, policy)
    if event.transition == Transition.MIGRATING_IN:
        return Decision(Action.NONE, 0.0, f"{guest.name}: {event.note}, still running on the source", None,
                        guest.intent, h, keep_pending=True)
    # the incoming copy stopped: the guest never ran here, whatever intent its first sight gave it
    intent: Intent = "held" if guest.intent == "held" else "stopped"
    return Decision(Action.NONE, 0.0, f"{guest.name}: {event.note}, no action", event.cause, intent, h)


def decide_migrated_in(guest: GuestRecord, history: History, now: float, policy: Selection) -> Decision:
    """A guest migrated in and runs here now (``RESUMED/MIGRATED``): adopt it. Pure.

    Intent ``running`` (``held`` stays held); the restart budget starts fresh (failures,
    attempt, given-up, pending retry of an earlier stay here are dropped: they were this
    host's past, and the source's budget does not travel). ``restarts`` counts stay (they
    are the ``libvirt_domain_restarts_total`` counter). Its policy is whatever selects it
    here, the domain XML metadata travelling with it first."""
    fresh = budget.record_start(History(restarts=history.restarts), now, policy.policy)
    intent: Intent = "held" if guest.intent == "held" else "running"
    how = "managed" if policy.managed else "observed only"
    return Decision(Action.NONE, 0.0, f"{guest.name} migrated in: adopted ({how}), intent {intent}, "
                    "restart budget fresh", None, intent, fresh, migrated_to=None)


def decide_recover(guest: GuestRecord, history: History, now: float, policy: Selection, why: str) -> Decision:
    """A guest whose intent is running is not running, with no failure to count
    (operator reset/release, an interrupted action): start it at once. Pure."""
    if not policy.managed or guest.intent != "running" or history.given_up:
        return Decision(Action.NONE, 0.0, f"{guest.name}: nothing to recover ({why})", None, guest.intent, history)
    if guest.state in ACTIVE and guest.state not in (DomainState.CRASHED,):
        return Decision(Action.NONE, 0.0, f"{guest.name}: already active ({why})", None, guest.intent, history)
    text = f"restart {guest.name}: {why}, in 0 s"
    return Decision(Action.RESTART, 0.0, text, None, "running", budget.schedule(history, now))


class ResyncStep(enum.StrEnum):
    """What to do with a guest's state found at a resync (:func:`resync_step`)."""

    RECOVER = "recover"  # an action of ours was cut short by a daemon stop: check the guest and recover
    KEEP = "keep"  # persist as is: a retry is scheduled, the boot flow decides, or nothing to do
    SCHEDULE = "schedule"  # a retry decided earlier (dry-run, before a restart) is not scheduled: schedule it
    DECIDE = "decide"  # decide on the state as on an event (a stop missed, a start against intent stopped)
    STABLE = "stable"  # running as intended: count its healthy running time


def resync_step(
    found: Classification,
    *,
    interrupted: bool,
    retry_scheduled: bool,
    boot_flow_pending: bool,
    next_retry: float | None,
    mode: str,
    intent: str,
    given_up: bool,
) -> ResyncStep:
    """Decide what a resync does with one guest. Pure.

    Args:
        found: :func:`~virtwatch.policy.classify.classify_state` of the ``(state, reason)`` found.
        interrupted: an action of ours on it was left open by a daemon stop.
        retry_scheduled: a pending action is scheduled in this daemon.
        boot_flow_pending: the boot flow of this host boot has not run yet (stops found then
            are the host's shutdown: the boot flow decides, not failure handling).
        next_retry: the persisted retry time (wall-clock seconds), or None.
        mode, intent, given_up: the guest's mode, intent and whether it was given up.
    """
    if interrupted and not retry_scheduled:
        return ResyncStep.RECOVER
    if retry_scheduled or (found.is_stop and boot_flow_pending):
        return ResyncStep.KEEP
    if next_retry is not None and found.is_stop and mode == "enforce" and intent == "running":
        return ResyncStep.SCHEDULE
    if found.transition == Transition.STARTED:
        return ResyncStep.DECIDE if intent == "stopped" else ResyncStep.STABLE
    if found.is_stop and intent == "running" and not given_up:
        return ResyncStep.DECIDE
    return ResyncStep.KEEP


def boot_candidate(
    *,
    autostart: str,
    managed: bool,
    persistent: bool,
    state: int,
    intent: str,
    was_running: bool,
    given_up: bool,
    stopped_this_boot: bool,
    migrated_away: bool = False,
) -> bool:
    """Whether the boot flow starts (or restores) a guest it lists after libvirt's autostart settled. Pure.

    Yes for a managed, persistent guest that is shut off, not held nor given up, not seen
    stopping by an event in this boot (that stop's own decision stands), whose ``autostart``
    is ``always``, or ``was-running`` with intent running or saved by the save path
    (``was_running``), and that did not migrate away (``migrated_away``: it runs on another
    host, starting this definition would run it twice). ``state`` is libvirt's domain state code.
    """
    wanted = autostart == "always" or (autostart == "was-running" and (intent == "running" or was_running))
    return (
        managed
        and persistent
        and state == DomainState.SHUTOFF
        and wanted
        and intent != "held"
        and not given_up
        and not stopped_this_boot
        and not migrated_away
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreFailurePlan:
    """What to do when a guest's managed-save image cannot be restored (:func:`restore_failure_plan`).

    Attributes:
        boot_action: the journalled cold boot (``discard-and-boot``, ``force-boot``), or None:
            leave the guest off, given up.
        remove_image: delete the image, then boot (``discard``); else boot ignoring it.
        give_up_reason: the given-up reason when the guest is left off, else None.
        alert: the ``restore_failed`` alert text.
        warning: the log line for a cold boot ("" when the guest is left off).
    """

    boot_action: str | None
    remove_image: bool
    give_up_reason: str | None
    alert: str
    warning: str = ""


def restore_failure_plan(name: str, how: str, code: int, message: str) -> RestoreFailurePlan:
    """``on_restore_failure`` (``keep``, ``discard``, ``force-boot``) applied to guest ``name``
    whose restore failed with libvirt error ``code``/``message``. Pure."""
    if how == "keep":
        return RestoreFailurePlan(
            None,
            False,
            "managed-save image cannot be restored",
            f"{name}: managed-save image cannot be restored ([{code}] {message}); image kept, "
            "guest left off (on_restore_failure = keep)",
        )
    return RestoreFailurePlan(
        "force-boot" if how == "force-boot" else "discard-and-boot",
        how == "discard",
        None,
        f"{name}: restore failed, image discarded, cold boot ({how})",
        f"{name}: managed-save image cannot be restored: discarding it and cold-booting "
        f"(on_restore_failure = {how}); the guest's saved RAM state is lost",
    )
