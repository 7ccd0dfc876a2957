"""Liveness failures in the policy: the pure decision, and the engine carrying it out on the fake."""

import pytest

from virtwatch.model import DomainState, RunningReason
from virtwatch.policy.budget import History
from virtwatch.policy.classify import StopCause
from virtwatch.policy.config import PolicySettings
from virtwatch.policy.decide import Action, GuestRecord, decide_liveness
from virtwatch.policy.select import select

from .rig import Rig

S = PolicySettings.model_validate({
    "enabled": True,
    "defaults": {"restart_delay": 10, "restart_backoff": 2, "restart_jitter": 0, "limit_burst": 2,
                 "limit_interval": 600},
    "match": [{"name": "leave"}, {"name": "reset", "on_probe_failure": "reset"},
              {"name": "restart", "on_probe_failure": "restart"}],
})
NOW = 1_800_000_000.0


def rec(name, intent="running", state=DomainState.RUNNING):
    return GuestRecord(name, "u-" + name, int(state), 1, intent)


def decide(name, history=History(), cause=StopCause.PROBE_FAILED, **kw):
    return decide_liveness(rec(name, **{k: kw.pop(k) for k in ("intent", "state") if k in kw}), cause, "3 failed",
                           history, NOW, select(S, name, "u-" + name, None), **kw)


def test_leave_is_no_action_with_the_cause_for_the_alert_annotation() -> None:
    d = decide("leave")
    assert (d.action, d.cause, d.key, d.alert) == (Action.NONE, StopCause.PROBE_FAILED, "on_probe_failure", None)
    assert d.reason == "leave unhealthy: probe_failed (3 failed): left alone, policy on_probe_failure from defaults"
    assert d.history.failures == ()  # leave counts nothing against the budget


def test_reset_and_restart_go_through_the_budget() -> None:
    d = decide("reset", cause=StopCause.CONSOLE_PANIC)
    assert (d.action, d.delay) == (Action.RESET, 10.0)
    assert d.reason.startswith("reset reset: console_panic, attempt 1/2, in 10 s, policy on_probe_failure from ")
    assert d.history.next_retry == NOW + 10 and len(d.history.failures) == 1
    d = decide("restart", cause=StopCause.HUNG)
    assert (d.action, d.delay) == (Action.KILL, 10.0)
    assert d.reason.startswith("kill and restart restart: hung, attempt 1/2")
    # the third failure within limit_interval: given up, with its alert
    h = History(failures=(NOW - 20, NOW - 10))
    for name in ("reset", "restart"):
        d = decide(name, h, cause=StopCause.REBOOT_LOOP)
        assert d.action == Action.GIVE_UP and d.history.given_up and d.alert, d


@pytest.mark.parametrize(("kw", "why"), [
    ({"intent": "held"}, "held by operator"),
    ({"busy": "migration_out"}, "migration_out job in progress"),
    ({"busy": "save"}, "save job in progress"),
    ({"state": DomainState.SHUTOFF}, "not running any more"),
    ({"intent": "stopped"}, "intent stopped"),
])
def test_never_acted_on_when_held_busy_or_not_running(kw, why) -> None:
    d = decide("restart", **kw)
    assert d.action == Action.NONE and why in d.reason, d.reason


def test_unmanaged_given_up_or_already_scheduled_guests_are_left() -> None:
    assert "not managed" in decide("other").reason
    assert "given up" in decide("restart", History(given_up=True, given_up_reason="x")).reason
    d = decide("restart", History(next_retry=NOW + 5))
    assert d.action == Action.NONE and d.keep_pending


def test_only_liveness_causes() -> None:
    with pytest.raises(ValueError):
        decide("restart", cause=StopCause.CRASH)


BASE = {
    "debounce": 0.5, "boot_settle_timeout": 0, "start_delay": 0,
    "defaults": {"restart_delay": 5, "restart_backoff": 1, "restart_jitter": 0, "limit_burst": 3,
                 "limit_interval": 600},
    "match": [{"name": "r", "on_probe_failure": "reset"}, {"name": "k", "on_probe_failure": "restart"},
              {"name": "l"}],
}


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, BASE)
    yield r
    await r.close()


def running(hv, name):
    return hv.add(name, state=DomainState.RUNNING, reason=RunningReason.BOOTED)


async def test_engine_resets_after_the_delay_and_counts_a_restart(rig):
    running(rig.hv, "r")
    await rig.start()
    rig.engine.on_liveness("r", "probe_failed", "3 consecutive agent_ping probes failed")
    await rig.run(1.0)
    assert rig.engine.snapshot().guests["r"].pending_action == "reset"
    assert rig.hv.count("job", "r") == 1
    await rig.run(5.0)
    assert rig.hv.count("reset", "r") == 1 and rig.hv.count("destroy") == 0
    snap = rig.engine.snapshot().guests["r"]
    assert dict(snap.restarts) == {"probe_failed": 1} and snap.pending_action is None
    assert rig.engine.snapshot().actions[("reset", "ok")] == 1
    rows = await rig.store.events("r")
    assert (rows[0]["kind"], rows[0]["event"], rows[0]["cause"]) == ("liveness", "PROBE_FAILED", "probe_failed")
    # a REBOOT arriving now is the reset's doing
    assert rig.engine.own_operation("r") == "reset"


async def test_engine_restart_destroys_at_once_then_starts_by_budget(rig):
    running(rig.hv, "k")
    await rig.start()
    rig.engine.on_liveness("k", "console_panic", "Kernel panic - not syncing: sysrq triggered crash")
    await rig.run(1.0)
    assert rig.hv.count("destroy", "k") == 1 and rig.hv.count("start", "k") == 0
    await rig.run(6.0)
    assert rig.hv.count("start", "k") == 1 and rig.hv.guests["k"].state == DomainState.RUNNING
    await rig.run(1.0)
    assert dict(rig.engine.snapshot().guests["k"].restarts) == {"console_panic": 1}


async def test_engine_drops_the_action_when_a_job_starts_before_it_is_due(rig):
    g = running(rig.hv, "r")
    await rig.start()
    rig.engine.on_liveness("r", "hung", "busy")
    await rig.run(1.0)
    g.job = "migration_out"
    await rig.run(10.0)
    assert rig.hv.count("reset") == 0
    assert rig.engine.snapshot().guests["r"].pending_action is None


async def test_engine_leaves_held_and_leave_guests_alone(rig):
    running(rig.hv, "k")
    running(rig.hv, "l")
    await rig.start()
    await rig.engine.hold("k")
    seen = []
    rig.engine.decision_listeners.append(lambda *a: seen.append(a))
    rig.engine.on_liveness("k", "reboot_loop", "3 reboots")
    rig.engine.on_liveness("l", "probe_failed", "3 failed")
    await rig.run(30.0)
    assert rig.hv.count("destroy") == rig.hv.count("reset") == rig.hv.count("start") == 0
    texts = {(g, c): text for g, c, text in seen}  # one worker per guest: either order
    assert set(texts) == {("k", "reboot_loop"), ("l", "probe_failed")}
    assert "held by operator" in texts["k", "reboot_loop"] and "left alone" in texts["l", "probe_failed"]
    with pytest.raises(ValueError):
        rig.engine.on_liveness("l", "crash", "not a liveness cause")
