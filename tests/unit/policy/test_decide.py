"""Pure decisions: every cause's default, budget integration, dry-run text, explanations."""

import pytest

from virtwatch.model import DomainState, ShutoffReason
from virtwatch.policy import budget
from virtwatch.policy.budget import History
from virtwatch.policy.classify import ClassifyInput, StopCause, classify, classify_state
from virtwatch.policy.config import GuestPolicy, PolicySettings
from virtwatch.policy.decide import (
    Action,
    GuestRecord,
    ResyncStep,
    boot_candidate,
    decide,
    decide_recover,
    initial_intent,
    restore_failure_plan,
    resync_step,
)
from virtwatch.policy.select import select

S = PolicySettings.model_validate({
    "enabled": True,
    "defaults": {"restart_delay": 10, "restart_backoff": 2, "restart_jitter": 0, "limit_burst": 5,
                 "limit_interval": 600, "stable_after": 60},
    "profile": {"critical": {"restart_delay": 10}},
    "match": [{"glob": "web*", "profile": "critical"}, {"name": "db", "on_io_error": "resume"},
              {"name": "kv", "on_io_error": "kill"}, {"name": "lab", "mode": "dry-run"},
              {"name": "fw", "on_watchdog": "leave", "on_crash": "leave"}],
})
NOW = 1_800_000_000.0


def rec(name="web1", intent="running", state=DomainState.SHUTOFF):
    return GuestRecord(name, "u-" + name, int(state), 0, intent)


def cls(event, detail, prev=None, kind="lifecycle", ours=None, host=False):
    return classify(ClassifyInput(kind, event, detail, prev, None, ours, host))


def sel(name):
    return select(S, name, "u-" + name, None)


@pytest.mark.parametrize("event, detail, prev, action, intent", [
    ("STOPPED", "CRASHED", None, Action.RESTART, "running"),
    ("CRASHED", "PANICKED", None, Action.RESTART, "running"),
    ("STOPPED", "FAILED", None, Action.RESTART, "running"),
    ("STOPPED", "SHUTDOWN", "HOST", Action.RESTART, "running"),
    ("STOPPED", "SHUTDOWN", "GUEST", Action.NONE, "stopped"),
    ("STOPPED", "DESTROYED", "HOST", Action.NONE, "stopped"),
    ("STOPPED", "SAVED", None, Action.NONE, "stopped"),
    ("STOPPED", "MIGRATED", None, Action.NONE, "stopped"),
    ("SUSPENDED", "WATCHDOG", None, Action.RESTART, "running"),
    ("SUSPENDED", "IOERROR", None, Action.ALERT, "running"),
    ("SUSPENDED", "API_ERROR", None, Action.ALERT, "running"),
    ("SUSPENDED", "PAUSED", None, Action.NONE, "running"),
])
def test_default_reaction(event, detail, prev, action, intent):
    d = decide(rec(), cls(event, detail, prev), History(), NOW, sel("web1"))
    assert (d.action, d.intent) == (action, intent)
    if action == Action.ALERT:
        assert d.alert


def test_restart_text_and_budget():
    d = decide(rec(), cls("STOPPED", "CRASHED"), History(), NOW, sel("web1"), rand=0.0)
    assert d.reason == "restart web1: crash, attempt 1/5, in 10 s, policy on_crash from defaults"
    assert d.delay == 10.0 and d.history.next_retry == NOW + 10
    h = budget.record_start(d.history.replace(next_retry=None), NOW + 12, sel("web1").policy)
    d2 = decide(rec(), cls("STOPPED", "CRASHED"), h, NOW + 20, sel("web1"))
    assert d2.reason == "restart web1: crash, attempt 2/5, in 20 s, policy on_crash from defaults"
    assert d2.message("dry-run") == "would " + d2.reason
    assert d2.message("enforce") == d2.reason


def test_dry_run_text_names_profile_source():
    s = PolicySettings.model_validate({"enabled": True, "mode": "dry-run",
                                       "profile": {"critical": {"on_crash": "restart", "restart_jitter": 0}},
                                       "match": [{"glob": "web*", "profile": "critical"}]})
    sl = select(s, "web1", "u", None)
    h = History(failures=(NOW - 30,), attempt=1, last_failure=NOW - 30, last_start=NOW - 25)
    d = decide(rec(), cls("STOPPED", "CRASHED"), h, NOW, sl)
    assert sl.mode == "dry-run"
    assert (
        d.message(sl.mode)
        == "would restart web1: crash, attempt 2/5, in 10 s, policy on_crash from profile critical (via match[0])"
    )


def test_given_up_after_burst():
    p = sel("web1")
    h = History()
    t = NOW
    actions = []
    for _ in range(6):
        d = decide(rec(), cls("STOPPED", "CRASHED"), h, t, p)
        actions.append(d.action)
        h = d.history.replace(next_retry=None)
        h = budget.record_start(h, t + 1, p.policy)
        t += 5
    assert actions == [Action.RESTART] * 5 + [Action.GIVE_UP]
    assert d.alert and "only 'virtwatch reset web1' re-enables it" in d.alert
    again = decide(rec(), cls("STOPPED", "CRASHED"), h, t, p)
    assert again.action == Action.NONE and "given up" in again.reason


def test_duplicate_stop_keeps_the_scheduled_retry():
    p = sel("web1")
    d1 = decide(rec(), cls("CRASHED", "PANICKED"), History(), NOW, p)
    d2 = decide(rec(), cls("STOPPED", "CRASHED"), d1.history, NOW + 1.4, p)
    assert d2.action == Action.NONE and d2.keep_pending
    assert d2.history.failures == (NOW,)


def test_intent_stopped_or_held_or_unmanaged_means_no_action():
    assert decide(rec(intent="stopped"), cls("STOPPED", "CRASHED"), History(), NOW, sel("web1")).action == Action.NONE
    d = decide(rec(intent="held"), cls("STOPPED", "CRASHED"), History(), NOW, sel("web1"))
    assert d.action == Action.NONE and d.intent == "held" and "held" in d.reason
    d = decide(rec("mail"), cls("STOPPED", "CRASHED"), History(), NOW, sel("mail"))
    assert d.action == Action.NONE and "not managed" in d.reason


def test_start_sets_intent_running_and_records_start():
    d = decide(rec(intent="stopped"), cls("STARTED", "BOOTED"), History(), NOW, sel("web1"))
    assert d.intent == "running" and d.history.last_start == NOW
    d = decide(rec(intent="held"), cls("STARTED", "BOOTED"), History(), NOW, sel("web1"))
    assert d.intent == "held"


def test_our_own_stop_is_ignored_and_keeps_pending():
    d = decide(
        rec(), cls("STOPPED", "DESTROYED", "HOST", ours="destroy"), History(next_retry=NOW + 5), NOW, sel("web1")
    )
    assert d.action == Action.NONE and d.cause == StopCause.OURS and d.keep_pending and d.intent == "running"


def test_host_shutdown_keeps_intent_running():
    d = decide(rec(), cls("STOPPED", "SHUTDOWN", "HOST", host=True), History(), NOW, sel("web1"))
    assert d.action == Action.NONE and d.intent == "running"


def test_io_error_resume_and_kill():
    d = decide(rec("db"), cls("SUSPENDED", "IOERROR"), History(), NOW, sel("db"))
    assert (
        d.action == Action.RESUME and d.delay == 30.0 and d.reason.startswith("resume db: I/O error, resume 1, in 30 s")
    )
    d = decide(rec("db"), cls("SUSPENDED", "IOERROR"), History(io_resumes=2, last_resume=NOW - 5), NOW, sel("db"))
    assert d.delay == 120.0
    d = decide(rec("kv"), cls("SUSPENDED", "IOERROR"), History(), NOW, sel("kv"))
    assert d.action == Action.KILL and d.history.failures == (NOW,) and d.delay == 10.0
    assert d.reason.startswith("kill and restart kv: io_error, attempt 1/5")


def test_leave_policies_alert_and_stop():
    d = decide(rec("fw"), cls("STOPPED", "CRASHED"), History(), NOW, sel("fw"))
    assert d.action == Action.ALERT and d.intent == "stopped" and "policy on_crash from match[4]" in d.reason
    d = decide(rec("fw"), cls("SUSPENDED", "WATCHDOG"), History(), NOW, sel("fw"))
    assert d.action == Action.ALERT and d.intent == "running"


def test_poweroff_restart_policy_counts_budget():
    s = PolicySettings.model_validate({"enabled": True, "match": [{"name": "k", "on_poweroff": "restart"}]})
    d = decide(rec("k"), cls("STOPPED", "SHUTDOWN", "GUEST"), History(), NOW, select(s, "k", "u", None))
    assert d.action == Action.RESTART and d.history.failures == (NOW,)


def test_jitter_comes_from_rand():
    s = PolicySettings.model_validate({"enabled": True, "defaults": {"restart_jitter": 0.5}, "match": [{"name": "j"}]})
    d = decide(rec("j"), cls("STOPPED", "FAILED"), History(), NOW, select(s, "j", "u", None), rand=0.5)
    assert d.delay == pytest.approx(5.0 * 1.25)


def test_recover_and_initial_intent():
    d = decide_recover(rec(), History(), NOW, sel("web1"), "operator reset")
    assert d.action == Action.RESTART and d.delay == 0 and d.reason == "restart web1: operator reset, in 0 s"
    assert decide_recover(rec(state=DomainState.RUNNING), History(), NOW, sel("web1"), "x").action == Action.NONE
    assert decide_recover(rec(), History(given_up=True), NOW, sel("web1"), "x").action == Action.NONE
    assert initial_intent(GuestPolicy(), DomainState.RUNNING) == "running"
    assert initial_intent(GuestPolicy(), DomainState.SHUTOFF) == "stopped"
    assert initial_intent(GuestPolicy(intent="running"), DomainState.SHUTOFF) == "running"


STOPPED = classify_state(DomainState.SHUTOFF, ShutoffReason.CRASHED)
RUNNING = classify_state(DomainState.RUNNING, 1)
PAUSED_USER = classify_state(DomainState.PAUSED, 1)
R = ResyncStep


@pytest.mark.parametrize(
    "found, interrupted, scheduled, boot_pending, next_retry, mode, intent, given_up, step",
    [
        # an action cut short by a daemon stop is recovered, unless a retry is already scheduled
        (STOPPED, True, False, False, None, "enforce", "running", False, R.RECOVER),
        (RUNNING, True, False, False, None, "enforce", "running", False, R.RECOVER),
        (STOPPED, True, True, False, None, "enforce", "running", False, R.KEEP),
        (STOPPED, False, True, False, NOW, "enforce", "running", False, R.KEEP),
        # stopped while the boot flow has yet to run: the host went down, the boot flow decides
        (STOPPED, False, False, True, None, "enforce", "running", False, R.KEEP),
        (RUNNING, False, False, True, None, "enforce", "running", False, R.STABLE),
        # a retry decided but not scheduled (dry-run then, enforce now; a restart): schedule it
        (STOPPED, False, False, False, NOW, "enforce", "running", False, R.SCHEDULE),
        (STOPPED, False, False, False, NOW, "dry-run", "running", False, R.DECIDE),
        (STOPPED, False, False, False, NOW, "enforce", "stopped", False, R.KEEP),
        # running: against an intent of stopped it is decided on (someone started it), else healthy time
        (RUNNING, False, False, False, None, "enforce", "stopped", False, R.DECIDE),
        (RUNNING, False, False, False, None, "enforce", "running", False, R.STABLE),
        (RUNNING, False, False, False, None, "enforce", "held", False, R.STABLE),
        # a stop missed while disconnected: decided on, unless not wanted running or given up
        (STOPPED, False, False, False, None, "enforce", "running", False, R.DECIDE),
        (STOPPED, False, False, False, None, "observe", "running", False, R.DECIDE),
        (STOPPED, False, False, False, None, "enforce", "running", True, R.KEEP),
        (STOPPED, False, False, False, None, "enforce", "stopped", False, R.KEEP),
        (STOPPED, False, False, False, None, "enforce", "held", False, R.KEEP),
        (PAUSED_USER, False, False, False, None, "enforce", "running", False, R.DECIDE),
        (classify_state(DomainState.NOSTATE, 0), False, False, False, None, "enforce", "running", False, R.KEEP),
    ],
)
def test_resync_step(found, interrupted, scheduled, boot_pending, next_retry, mode, intent, given_up, step):
    assert (
        resync_step(
            found,
            interrupted=interrupted,
            retry_scheduled=scheduled,
            boot_flow_pending=boot_pending,
            next_retry=next_retry,
            mode=mode,
            intent=intent,
            given_up=given_up,
        )
        == step
    )


BOOT = dict(
    autostart="was-running",
    managed=True,
    persistent=True,
    state=DomainState.SHUTOFF,
    intent="running",
    was_running=False,
    given_up=False,
    stopped_this_boot=False,
)


@pytest.mark.parametrize(
    "change, candidate",
    [
        ({}, True),
        ({"intent": "stopped"}, False),
        ({"intent": "stopped", "was_running": True}, True),  # saved by the save path at host shutdown
        ({"autostart": "always", "intent": "stopped"}, True),
        ({"autostart": "never"}, False),
        ({"managed": False}, False),
        ({"persistent": False}, False),
        ({"state": DomainState.RUNNING}, False),
        ({"state": DomainState.PAUSED}, False),
        ({"intent": "held", "autostart": "always"}, False),
        ({"given_up": True}, False),
        ({"stopped_this_boot": True}, False),  # its own stop event decides
    ],
)
def test_boot_candidate(change, candidate):
    assert boot_candidate(**{**BOOT, **change}) is candidate


def test_restore_failure_keep_leaves_the_guest_off_given_up():
    p = restore_failure_plan("db", "keep", 9, "cannot restore managed save image")
    assert (p.boot_action, p.remove_image, p.give_up_reason, p.warning) == (
        None,
        False,
        "managed-save image cannot be restored",
        "",
    )
    assert p.alert == (
        "db: managed-save image cannot be restored ([9] cannot restore managed save image); "
        "image kept, guest left off (on_restore_failure = keep)"
    )


@pytest.mark.parametrize(
    "how, action, remove", [("discard", "discard-and-boot", True), ("force-boot", "force-boot", False)]
)
def test_restore_failure_cold_boots_loudly(how, action, remove):
    p = restore_failure_plan("db", how, 9, "x")
    assert (p.boot_action, p.remove_image, p.give_up_reason) == (action, remove, None)
    assert p.alert == f"db: restore failed, image discarded, cold boot ({how})"
    assert p.warning == (
        f"db: managed-save image cannot be restored: discarding it and cold-booting "
        f"(on_restore_failure = {how}); the guest's saved RAM state is lost"
    )
