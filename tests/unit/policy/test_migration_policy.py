"""Live migration in the policy: classification, decisions, the boot flow and the engine
(on the libvirt sequences recorded in tests/e2e/test_migration.py)."""

import pytest

from virtwatch.alerts.rules import RuleContext, actions_for_event
from virtwatch.model import DomainState, Event, PausedReason, RunningReason, ShutoffReason
from virtwatch.policy.budget import History
from virtwatch.policy.classify import ClassifyInput, StopCause, Transition, classify
from virtwatch.policy.config import PolicySettings
from virtwatch.policy.decide import Action, GuestRecord, boot_candidate, decide
from virtwatch.policy.select import select

from .rig import Rig

S = PolicySettings.model_validate({"enabled": True, "match": [{"glob": "*"}],
                                   "defaults": {"restart_delay": 10, "restart_jitter": 0, "limit_burst": 2}})
NOW = 1_800_000_000.0


def cls(event, detail, migrating_in=False):
    return classify(ClassifyInput("lifecycle", event, detail, migrating_in=migrating_in))


def test_classification_of_both_ends():
    assert cls("STARTED", "MIGRATED").transition == Transition.MIGRATING_IN
    assert cls("RESUMED", "MIGRATED", migrating_in=True).transition == Transition.MIGRATED_IN
    assert cls("RESUMED", "MIGRATED").transition == Transition.RESUMED  # a source resumed after a failure
    failed = cls("STOPPED", "FAILED", migrating_in=True)
    assert (failed.transition, failed.cause) == (Transition.STOPPED, StopCause.MIGRATION_FAILED)
    assert cls("STOPPED", "FAILED").cause == StopCause.QEMU_FAILURE  # outside a migration: a real failure
    assert cls("SUSPENDED", "MIGRATED").cause == StopCause.TRANSIENT_PAUSE
    assert cls("STOPPED", "MIGRATED").cause == StopCause.MIGRATED


def history_with_failures():
    return History(failures=(NOW - 30, NOW - 20), attempt=2, given_up=True, given_up_reason="2 failures",
                   next_retry=NOW + 5, restarts={"crash": 2})


def test_source_migrated_away_no_action_intent_stopped_marked():
    g = GuestRecord("g", "u", DomainState.SHUTOFF, ShutoffReason.MIGRATED, "running")
    d = decide(g, cls("STOPPED", "MIGRATED"), History(), NOW, select(S, "g", "u", None))
    assert (d.action, d.intent, d.migrated_to, d.alert) == (Action.NONE, "stopped", "", None)


def test_destination_adopts_with_a_fresh_budget():
    sel = select(S, "g", "u", None)
    g = GuestRecord("g", "u", DomainState.PAUSED, PausedReason.MIGRATION, "stopped")
    d = decide(g, cls("STARTED", "MIGRATED"), history_with_failures(), NOW, sel)
    assert (d.action, d.intent) == (Action.NONE, "stopped")  # still running on the source
    g = GuestRecord("g", "u", DomainState.RUNNING, RunningReason.MIGRATED, "stopped")
    d = decide(g, cls("RESUMED", "MIGRATED", migrating_in=True), history_with_failures(), NOW, sel)
    assert (d.action, d.intent) == (Action.NONE, "running")
    h = d.history
    assert (h.failures, h.attempt, h.given_up, h.next_retry) == ((), 0, False, None)
    assert h.last_start == NOW and dict(h.restarts) == {"crash": 2}
    assert "restart budget fresh" in d.reason
    held = decide(GuestRecord("g", "u", 1, 2, "held"), cls("RESUMED", "MIGRATED", True), History(), NOW, sel)
    assert held.intent == "held"


@pytest.mark.parametrize("intent", ["stopped", "running"])
def test_failed_incoming_copy_is_no_failure(intent):
    """Whatever intent its first sight gave it ([policy] intent = "running", say), the guest never ran here."""
    g = GuestRecord("g", "u", DomainState.SHUTOFF, ShutoffReason.FAILED, intent)
    d = decide(g, cls("STOPPED", "FAILED", migrating_in=True), History(), NOW, select(S, "g", "u", None))
    assert (d.action, d.intent, d.alert, d.migrated_to) == (Action.NONE, "stopped", None, None)


def test_boot_flow_never_starts_a_guest_that_migrated_away():
    kw = dict(autostart="always", managed=True, persistent=True, state=DomainState.SHUTOFF, intent="stopped",
              was_running=False, given_up=False, stopped_this_boot=False)
    assert boot_candidate(**kw)
    assert not boot_candidate(**kw, migrated_away=True)


def test_alert_rules_ignore_the_failed_incoming_copy():
    ev = Event(1.0, 1, "domain", "lifecycle", "g", "u", "STOPPED", "FAILED")
    assert actions_for_event(ev, RuleContext("hv", migrating_in=True)) == []
    assert [a.alertname for a in actions_for_event(ev, RuleContext("hv"))] == ["VirtwatchQemuFailed"]


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, {"debounce": 0.2, "boot_settle_timeout": 0, "start_delay": 0,
                       "defaults": {"restart_delay": 1, "restart_jitter": 0, "limit_burst": 3},
                       "match": [{"glob": "*"}]})
    yield r
    await r.close()


async def test_engine_source_then_destination_then_panic(rig):
    """Source: the guest leaves (no restart, row marked). Destination: an aborted attempt changes
    nothing, the next one adopts it, and a panic after it is restarted here."""
    src = rig.hv.add("g", state=DomainState.RUNNING, reason=RunningReason.BOOTED)
    await rig.start()
    rig.feed("g", "SUSPENDED", "MIGRATED")
    src.state, src.reason = DomainState.SHUTOFF, ShutoffReason.MIGRATED
    rig.feed("g", "STOPPED", "MIGRATED")
    await rig.run(15.0)
    snap = rig.engine.snapshot().guests["g"]
    assert (snap.intent, snap.migrated_to, snap.pending_action) == ("stopped", "", None)
    assert rig.hv.count("start") == 0 and rig.alerts == []
    assert (await rig.store.get_guest("g")).migrated_to == ""  # persisted
    # it comes back: an aborted attempt first (the incoming copy fails), then a good one
    rig.feed("g", "STARTED", "MIGRATED")
    rig.feed("g", "STOPPED", "FAILED")
    await rig.run(15.0)
    snap = rig.engine.snapshot().guests["g"]
    assert (snap.intent, snap.migrated_to, snap.pending_action) == ("stopped", "", None)
    assert rig.hv.count("start") == 0 and rig.alerts == []
    rig.feed("g", "STARTED", "MIGRATED")
    src.state, src.reason = DomainState.RUNNING, RunningReason.MIGRATED
    rig.feed("g", "RESUMED", "MIGRATED")
    await rig.run(1.0)
    snap = rig.engine.snapshot().guests["g"]
    assert (snap.intent, snap.migrated_to) == ("running", None)
    rig.hv.crash("g")
    await rig.run(5.0)
    assert rig.hv.count("start") == 1 and rig.hv.guests["g"].state == DomainState.RUNNING


def test_schema_1_database_gains_migrated_to_in_place(tmp_path):
    """A state database written before live-migration handling keeps its rows; the new column is NULL."""
    import sqlite3

    from virtwatch.policy.model import GuestState
    from virtwatch.policy.store import MIGRATIONS, Store

    path = tmp_path / "state.db"
    c = sqlite3.connect(path)
    c.executescript(MIGRATIONS[0])
    c.execute("INSERT INTO guests (name, uuid, intent) VALUES ('g', 'u', 'running')")
    c.execute("PRAGMA user_version=1")
    c.commit()
    c.close()
    s = Store.open(path)
    try:
        assert s.schema_version == 2 and s.moved_aside is None
        g = s.get_guest("g")
        assert (g.intent, g.migrated_to) == ("running", None)
        s.save_guest(GuestState("g", "u", "stopped", migrated_to=""))
    finally:
        s.close()
    s = Store.open(path)
    try:
        assert s.get_guest("g").migrated_to == ""
    finally:
        s.close()
