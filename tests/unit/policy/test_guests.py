"""The guest table and the action journal, on a real store: intent before act, outcomes read
from errors, interrupted actions closed, our own operations told apart from the guest's."""

from __future__ import annotations

import pytest

from virtwatch.policy.budget import History
from virtwatch.policy.clock import FakeClock
from virtwatch.policy.config import PolicySettings
from virtwatch.policy.fakes import FakeHypervisor
from virtwatch.policy.guests import ActionJournal, GuestTable, Outcome
from virtwatch.policy.model import GuestState, OpTag
from virtwatch.policy.ports import ErrorCode, HypervisorError
from virtwatch.policy.store import AsyncStore


@pytest.fixture
async def store(tmp_path):
    s = AsyncStore(tmp_path / "state.db", clock=lambda: 1000.0)
    await s.open()
    yield s
    await s.close()


def table(store: AsyncStore, clock: FakeClock | None = None, **settings) -> GuestTable:
    return GuestTable(PolicySettings.model_validate({"enabled": True, **settings}), FakeHypervisor(), store,
                      clock or FakeClock())


async def test_the_intent_is_committed_before_the_act_and_the_outcome_after(store):
    t, journal = table(store), ActionJournal(store)
    g = t.get("web1", "u1")
    g.st = g.st.replace(intent="running", history=History(restarts={"crash": 1}))  # counters bumped first
    seen_during = []

    async def act() -> Outcome:
        seen_during.extend(await store.interrupted_actions())  # what a SIGKILL now would leave behind
        seen_during.append(await store.get_guest("web1"))
        return Outcome("restored", "from its image")

    out = await journal.run(g, "restore", "boot flow", act)
    assert out == Outcome("restored", "from its image")
    row, persisted = seen_during
    assert (row.guest, row.action, row.reason, row.finished) == ("web1", "restore", "boot flow", None)
    assert dict(persisted.history.restarts) == {"crash": 1}
    assert await store.interrupted_actions() == []
    done = (await store.actions("web1"))[0]
    assert (done.action, done.result, done.detail, done.finished) == ("restore", "restored", "from its image", 1000.0)
    assert journal.counts == {("restore", "restored"): 1}


async def test_errors_are_read_into_outcomes(store):
    t, journal = table(store), ActionJournal(store)
    g = t.get("db", "u2")

    async def raises(code: int, message: str) -> None:
        raise HypervisorError(code, message)

    out = await journal.run(g, "start", "restart", lambda: raises(ErrorCode.XML_ERROR, "bad XML"))
    assert (out.result, out.detail, out.error.code) == ("failed", "[27] bad XML", ErrorCode.XML_ERROR)
    benign = await journal.run(g, "kill", "io error", lambda: raises(ErrorCode.OPERATION_INVALID, "not running"),
                               on_error=lambda err: Outcome("ok", "not running"))
    assert benign == Outcome("ok", "not running") and benign.error is None
    await journal.run(g, "discard-and-boot", "restore failed", lambda: raises(1, "boom"), count_as="discard")
    assert journal.counts == {("start", "failed"): 1, ("kill", "ok"): 1, ("discard", "failed"): 1}
    assert [(r.action, r.result, r.detail) for r in await store.actions("db")] == [
        ("discard-and-boot", "failed", "[1] boom"), ("kill", "ok", "not running"), ("start", "failed", "[27] bad XML")]


async def test_a_bug_in_the_act_leaves_the_row_open_for_the_next_start_to_close(store):
    t, journal = table(store), ActionJournal(store)
    g = t.get("x")

    async def bug() -> None:
        raise RuntimeError("a bug, not a libvirt error")

    with pytest.raises(RuntimeError):
        await journal.run(g, "resume", "I/O error pause", bug)
    rows = await store.interrupted_actions()
    assert [(r.guest, r.action) for r in rows] == [("x", "resume")]
    later = ActionJournal(store)  # the next daemon
    await later.close_interrupted(rows)
    assert await store.interrupted_actions() == []
    assert (await store.actions("x"))[0].result == "interrupted"
    assert later.counts == {("resume", "interrupted"): 1}


async def test_events_within_our_operation_and_its_grace_are_ours(store):
    clock = FakeClock()
    t = table(store, clock, own_event_grace=5.0)
    g = t.get("a")
    await clock.advance(12.0)

    async def answer() -> str:
        return "done"

    assert await t.tagged(g, "resume", answer()) == "done"
    assert [(o.op, o.started, o.ended) for o in g.ops] == [("resume", 12.0, 12.0)]
    g.ops = [OpTag("start", 10.0, 12.0)]
    assert [t.is_ours(g, at) for at in (9.9, 10.0, 12.0, 17.0, 17.1)] == [None, "start", "start", "start", None]
    g.ops.append(OpTag("destroy", 11.0, 11.5))
    assert t.is_ours(g, 12.0) == "destroy"  # a stop within both is the stopping operation's
    await clock.advance(6.0)
    assert t.is_ours(g, 12.0) is None and g.ops == []  # past their grace, tags are dropped


async def test_persisted_state_wins_over_an_entry_made_before_start(store):
    t = table(store)
    early = t.get("a", "uuid-from-event")  # an event met the guest before start loaded it
    loaded = t.load({"a": GuestState("a", "", "held"), "b": GuestState("b", "ub", "running")})
    assert loaded[0] is early and (early.st.intent, early.st.uuid) == ("held", "uuid-from-event")
    assert t.known("b").st.intent == "running"
    with pytest.raises(KeyError):
        t.known("never-seen")
