"""Engine behaviour on the in-memory hypervisor with a fake clock (no libvirt)."""

import pytest

from virtwatch.model import DomainState, RunningReason, ShutoffReason
from virtwatch.policy.budget import History
from virtwatch.policy.model import GuestState
from virtwatch.policy.ports import ErrorCode, HypervisorError

from .rig import Rig

BASE = {
    "debounce": 0.5, "boot_settle_timeout": 0, "start_delay": 0,
    "defaults": {"restart_delay": 10, "restart_backoff": 2, "restart_jitter": 0, "limit_burst": 3,
                 "limit_interval": 600, "stable_after": 60},
    "match": [{"glob": "*"}],
}


def running(hv, name, **kw):
    return hv.add(name, state=DomainState.RUNNING, reason=RunningReason.BOOTED, **kw)


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, BASE)
    yield r
    await r.close()


async def test_crash_restarted_after_restart_delay(rig):
    running(rig.hv, "web1")
    await rig.start()
    assert rig.engine.snapshot().guests["web1"].intent == "running"
    rig.hv.crash("web1")
    t0 = rig.clock.time()
    await rig.run(1.0)
    snap = rig.engine.snapshot().guests["web1"]
    assert snap.pending_action == "restart"
    assert snap.next_retry == pytest.approx(t0 + 0.5 + 10.0, abs=0.3)
    await rig.run(8.5)
    assert rig.hv.count("start") == 0
    await rig.run(1.5)
    assert rig.hv.count("start") == 1
    assert rig.hv.guests["web1"].state == DomainState.RUNNING
    await rig.run(1.0)
    snap = rig.engine.snapshot().guests["web1"]
    assert dict(snap.restarts) == {"crash": 1}
    assert snap.pending_action is None and snap.next_retry is None and snap.intent == "running"
    assert rig.engine.snapshot().actions[("start", "ok")] == 1
    row = (await rig.store.actions("web1"))[0]
    assert (row.action, row.result) == ("start", "ok")


async def test_poweroff_and_admin_destroy_stay_off(rig):
    running(rig.hv, "a")
    running(rig.hv, "b")
    await rig.start()
    rig.hv.guests["a"].state = DomainState.SHUTOFF
    rig.feed("a", "SHUTDOWN", "GUEST")
    rig.feed("a", "STOPPED", "SHUTDOWN")
    rig.hv.guests["b"].state = DomainState.SHUTOFF
    rig.feed("b", "SHUTDOWN", "HOST")
    rig.feed("b", "STOPPED", "DESTROYED")
    await rig.run(700)
    assert rig.hv.count("start") == 0
    g = rig.engine.snapshot().guests
    assert (g["a"].intent, g["b"].intent) == ("stopped", "stopped")
    assert (await rig.store.events("a"))[0]["cause"] == "guest_poweroff"
    assert (await rig.store.events("b"))[0]["cause"] == "admin_destroy"


async def test_host_side_sigterm_is_restarted(rig):
    running(rig.hv, "a")
    await rig.start()
    rig.hv.guests["a"].state = DomainState.SHUTOFF
    rig.feed("a", "SHUTDOWN", "HOST")
    rig.feed("a", "STOPPED", "SHUTDOWN")
    await rig.run(11)
    assert rig.hv.count("start", "a") == 1
    assert dict(rig.engine.snapshot().guests["a"].restarts) == {"host_kill": 1}


async def crash_soon_after_each_start(rig, name, times):
    for _ in range(times):
        rig.hv.crash(name)
        before = rig.hv.count("start", name)
        for _ in range(400):
            if rig.hv.count("start", name) > before:
                break
            await rig.run(0.5)
        await rig.run(1.0)


async def test_crash_loop_given_up_after_limit_burst(rig):
    running(rig.hv, "bad")
    await rig.start()
    await crash_soon_after_each_start(rig, "bad", 4)
    assert rig.hv.count("start", "bad") == 3
    snap = rig.engine.snapshot().guests["bad"]
    assert snap.given_up and snap.pending_action is None
    assert "4 failures within 600 s (limit_burst 3)" in snap.given_up_reason
    assert [a.kind for a in rig.alerts] == ["given_up"]
    assert dict(snap.restarts) == {"crash": 3}
    await rig.run(300)
    assert rig.hv.count("start", "bad") == 3
    # reset re-enables and starts it at once
    snap = await rig.engine.reset("bad")
    assert not snap.given_up
    await rig.run(1)
    assert rig.hv.count("start", "bad") == 4


async def test_backoff_delays_between_attempts(rig):
    running(rig.hv, "x")
    await rig.start()
    times = []
    for _ in range(3):
        rig.hv.crash("x")
        t0 = rig.clock.monotonic()
        before = rig.hv.count("start")
        while rig.hv.count("start") == before:
            await rig.run(0.5)
        times.append(rig.clock.monotonic() - t0)
        await rig.run(1.0)   # crashes again 1 s after start: not stable
    # delay + debounce (0.5 s) + the 0.5 s step of the test's time loop
    assert [d + 0.5 <= t <= d + 1.0 for t, d in zip(times, (10, 20, 40), strict=True)] == [True] * 3, times


async def test_not_ready_means_no_decision(rig):
    running(rig.hv, "a")
    await rig.start()
    rig.engine.set_ready(False)
    rig.hv.crash("a")
    await rig.run(100)
    assert rig.hv.count("start") == 0
    assert rig.engine.snapshot().guests["a"].pending_action is None
    rig.engine.set_ready(True)
    await rig.run(11)
    assert rig.hv.count("start") == 1


async def test_storm_of_duplicate_events_gives_one_action(rig):
    running(rig.hv, "s")
    await rig.start()
    rig.hv.crash("s")
    rig.pump()
    for _ in range(1000):
        rig.feed("s", "CRASHED", "PANICKED")
        rig.feed("s", "STOPPED", "CRASHED")
    await rig.run(12)
    assert rig.hv.count("start") == 1
    assert rig.engine.snapshot().guests["s"].failures_in_window == 1


async def test_flapping_guest_is_given_up_without_action_storm(rig):
    """Someone else keeps starting a guest that crashes at once: each start+crash is a failure."""
    running(rig.hv, "f")
    await rig.start()
    for _ in range(50):
        rig.hv.crash("f")
        await rig.hv.start("f")
        rig.pump()
        await rig.run(0.25)
    await rig.run(300)
    snap = rig.engine.snapshot().guests["f"]
    assert snap.given_up
    ours = sum(1 for r in await rig.store.actions("f", limit=1000) if r.action == "start")
    assert ours <= 3
    assert [a.kind for a in rig.alerts].count("given_up") == 1


async def test_our_own_destroy_is_not_reacted_to_kill_policy(tmp_path):
    r = Rig(tmp_path, {**BASE, "match": [{"glob": "*", "on_io_error": "kill"}]})
    try:
        running(r.hv, "db")
        await r.start()
        r.hv.pause_io_error("db")
        r.feed("db", "IO_ERROR", "enospc", kind="io_error", payload={"src": "/x", "dev": "vda", "action": "PAUSE"})
        await r.run(1)
        assert r.hv.count("destroy") == 1
        await r.run(11)
        assert r.hv.count("start") == 1 and r.hv.count("destroy") == 1
        ev = next(e for e in await r.store.events("db") if e["event"] == "STOPPED")
        assert ev["cause"] == "ours"
        assert r.engine.snapshot().guests["db"].failures_in_window == 1
    finally:
        await r.close()


async def test_io_error_resume_with_backoff(tmp_path):
    r = Rig(tmp_path, {**BASE, "match": [{"glob": "*", "on_io_error": "resume", "io_error_resume_delay": 5}]})
    try:
        running(r.hv, "db")
        await r.start()
        r.hv.pause_io_error("db")
        await r.run(6)
        assert r.hv.count("resume") == 1
        r.hv.pause_io_error("db")
        await r.run(6)
        assert r.hv.count("resume") == 1   # second resume waits 10 s
        await r.run(5)
        assert r.hv.count("resume") == 2
    finally:
        await r.close()


async def test_io_error_leave_alerts(rig):
    running(rig.hv, "d")
    await rig.start()
    rig.hv.pause_io_error("d")
    await rig.run(60)
    assert rig.hv.count("resume") == 0 and rig.hv.count("destroy") == 0
    assert [a.kind for a in rig.alerts] == ["io_error"]


async def test_dry_run_logs_and_journals_but_does_nothing(tmp_path):
    r = Rig(tmp_path, {**BASE, "mode": "dry-run"})
    try:
        running(r.hv, "web1")
        await r.start()
        r.hv.crash("web1")
        await r.run(60)
        assert r.hv.count("start") == 0
        decisions = [(e["event"], e["decision"]) for e in reversed(await r.store.events("web1"))
                     if e["event"] in ("CRASHED", "STOPPED")]
        assert decisions == [
            ("CRASHED", "crash noted: waiting for libvirt to stop the guest"),
            ("STOPPED", "restart: would restart web1: crash, attempt 1/3, in 10 s, policy on_crash from defaults"),
        ]
        assert r.engine.snapshot().guests["web1"].pending_action is None
    finally:
        await r.close()


async def test_hold_blocks_actions_release_follows_state(rig):
    running(rig.hv, "h")
    await rig.start()
    await rig.engine.hold("h")
    rig.hv.crash("h")
    await rig.run(30)
    assert rig.hv.count("start") == 0
    assert rig.engine.snapshot().guests["h"].intent == "held"
    assert (await rig.engine.release("h")).intent == "stopped"
    with pytest.raises(KeyError):
        await rig.engine.hold("nope")


async def test_hold_cancels_pending_restart(rig):
    running(rig.hv, "h")
    await rig.start()
    rig.hv.crash("h")
    await rig.run(2)
    assert rig.engine.snapshot().guests["h"].pending_action == "restart"
    await rig.engine.hold("h")
    await rig.run(30)
    assert rig.hv.count("start") == 0


async def test_manual_start_cancels_pending_restart(rig):
    running(rig.hv, "m")
    await rig.start()
    rig.hv.crash("m")
    await rig.run(2)
    await rig.hv.start("m")
    await rig.run(30)
    assert rig.hv.count("start") == 1  # only the manual one
    assert rig.engine.snapshot().guests["m"].pending_action is None


async def test_breaker_defers_actions_beyond_limit(tmp_path):
    r = Rig(tmp_path, {**BASE, "max_actions_per_minute": 3})
    try:
        for i in range(6):
            running(r.hv, f"g{i}")
        await r.start()
        for i in range(6):
            r.hv.crash(f"g{i}")
        await r.run(15)
        assert r.hv.count("start") == 3
        assert r.engine.snapshot().breaker_open
        assert [a.kind for a in r.alerts].count("breaker_open") == 1
        await r.run(60)
        assert r.hv.count("start") == 6
    finally:
        await r.close()


async def test_permanent_start_error_gives_up_at_once(rig):
    running(rig.hv, "p")
    await rig.start()
    rig.hv.fail[("start", "p")] = HypervisorError(ErrorCode.XML_ERROR, "bad XML")
    rig.hv.crash("p")
    await rig.run(11)
    snap = rig.engine.snapshot().guests["p"]
    assert snap.given_up and "failed permanently: [27] bad XML" in snap.given_up_reason
    assert rig.hv.count("start") == 1


async def test_transient_start_error_retries_with_backoff(rig):
    running(rig.hv, "t")
    await rig.start()
    rig.hv.fail[("start", "t")] = HypervisorError(ErrorCode.INTERNAL_ERROR, "boom")
    rig.hv.crash("t")
    await rig.run(11)
    assert rig.hv.count("start") == 1
    del rig.hv.fail[("start", "t")]
    await rig.run(21)
    assert rig.hv.count("start") == 2
    assert rig.hv.guests["t"].state == DomainState.RUNNING


async def test_hung_start_hits_the_deadline(tmp_path):
    r = Rig(tmp_path, {**BASE, "action_timeout": 0.05})
    try:
        running(r.hv, "h")
        await r.start()
        r.hv.hang.add(("start", "h"))
        r.hv.crash("h")
        await r.run(11.5)  # the 0.05 s deadline passes in the clock's time: no real waiting
        snap = r.engine.snapshot()
        assert snap.actions[("start", "failed")] == 1
        assert snap.guests["h"].pending_action == "restart"
        assert r.alerts[-1].kind == "start_failed" and "[68]" in r.alerts[-1].message
    finally:
        await r.close()


async def test_already_running_counts_as_success(rig):
    running(rig.hv, "r")
    await rig.start()
    rig.hv.crash("r")
    await rig.run(2)
    rig.hv.guests["r"].state = DomainState.RUNNING  # someone started it; event lost
    await rig.run(10)
    assert rig.engine.snapshot().actions[("restart", "already_running")] == 1
    assert rig.hv.count("start") == 0


async def test_daemon_restart_mid_backoff_no_repeat(rig):
    running(rig.hv, "d")
    await rig.start()
    rig.hv.crash("d")
    await rig.run(4)
    await rig.restart_daemon()
    assert rig.engine.snapshot().guests["d"].pending_action == "restart"
    await rig.run(5)
    assert rig.hv.count("start") == 0
    await rig.run(2)
    assert rig.hv.count("start") == 1
    await rig.run(100)
    assert rig.hv.count("start") == 1
    assert rig.engine.snapshot().guests["d"].failures_in_window == 1


async def test_interrupted_action_is_recovered_not_repeated(tmp_path):
    r = Rig(tmp_path, BASE)
    try:
        r.hv.add("a")  # shut off: the interrupted start never happened
        running(r.hv, "b")  # running: the interrupted start did happen
        await r.store.open()
        for n in ("a", "b"):
            await r.store.begin_action(
                GuestState(
                    n,
                    r.hv.guests[n].uuid,
                    "running",
                    History(failures=(r.clock.time(),), attempt=1, restarts={"crash": 1}),
                ),
                "start",
                "restart",
            )
        await r.start()
        await r.run(1)
        assert r.hv.count("start", "a") == 1 and r.hv.count("start", "b") == 0
        assert {row.result for row in await r.store.actions() if row.action == "start" and row.guest == "b"} == {
            "interrupted"
        }
        assert r.engine.snapshot().actions[("start", "interrupted")] == 2
    finally:
        await r.close()


async def test_missed_crash_found_at_resync(rig):
    running(rig.hv, "m")
    await rig.start()
    rig.engine.set_ready(False)
    rig.hv.guests["m"].state, rig.hv.guests["m"].reason = DomainState.SHUTOFF, 3  # crashed while disconnected
    await rig.run(1)
    rig.engine.set_ready(True)
    await rig.run(11)
    assert rig.hv.count("start") == 1
    assert dict(rig.engine.snapshot().guests["m"].restarts) == {"crash": 1}


async def test_unmanaged_guest_is_observed_only(tmp_path):
    r = Rig(tmp_path, {**BASE, "match": [{"name": "only-me"}]})
    try:
        running(r.hv, "other")
        await r.start()
        r.hv.crash("other")
        await r.run(30)
        assert r.hv.count("start") == 0
        snap = r.engine.snapshot().guests["other"]
        assert not snap.managed and snap.mode == "observe"
    finally:
        await r.close()


async def test_explain(rig):
    running(rig.hv, "e", metadata='<policy restart_delay="3"/>')
    await rig.start()
    ex = rig.engine.explain("e")
    assert ex.managed and ex.policy["restart_delay"] == 3.0 and ex.sources["restart_delay"] == "metadata"
    assert ex.sources["limit_burst"] == "defaults"
    assert ex.decision_now == "e is running: nothing to do"
    rig.hv.crash("e")
    await rig.run(1)
    assert rig.engine.explain("e").decision_now.startswith("restart pending at")
    text = "\n".join(ex.lines())
    assert "restart_delay = 3.0  [metadata]" in text


async def test_override_applies(rig):
    running(rig.hv, "o")
    await rig.start()
    await rig.engine.set_override("o", {"on_crash": "leave"})
    rig.hv.crash("o")
    await rig.run(30)
    assert rig.hv.count("start") == 0
    assert rig.engine.explain("o").sources["on_crash"] == "override"
    with pytest.raises(ValueError):
        await rig.engine.set_override("o", {"on_crash": "nope"})


async def test_override_is_persisted_shown_and_reloaded(rig):
    running(rig.hv, "o")
    await rig.start()
    await rig.engine.set_override("o", {"mode": "dry-run"})
    assert rig.engine.snapshot().guests["o"].mode == "dry-run"
    await rig.engine.set_override("o", {"on_host_shutdown": "shutdown:30", "restart_delay": 4})  # replaces
    stored = {"on_host_shutdown": [{"action": "shutdown", "timeout": 30.0}], "restart_delay": 4.0}
    assert dict((await rig.store.get_guest("o")).override) == stored
    snap = rig.engine.snapshot().guests["o"]
    assert snap.mode == "enforce" and dict(snap.override) == stored
    await rig.restart_daemon()
    assert rig.engine.explain("o").sources["on_host_shutdown"] == "override"
    rep = await rig.engine.save_guests()  # the reloaded steps work: a clean shutdown, not the default managed save
    assert dict(rep.results) == {"o": "shutdown"} and rig.hv.count("managed_save") == 0
    await rig.engine.set_override("o", {})
    assert (
        dict((await rig.store.get_guest("o")).override) == {}
        and rig.engine.explain("o").sources["restart_delay"] == "defaults"
    )


async def test_undefined_guest_is_forgotten(rig):
    running(rig.hv, "t")
    await rig.start()
    rig.hv.crash("t")
    rig.pump()
    del rig.hv.guests["t"]
    rig.feed("t", "UNDEFINED", "REMOVED")
    await rig.run(30)
    assert rig.hv.count("start") == 0
    assert "t" not in rig.engine.snapshot().guests
    assert await rig.store.get_guest("t") is None


async def test_one_panic_counts_once_even_when_the_stop_comes_after_the_restart_delay(tmp_path):
    """CRASHED/PANICKED then STOPPED/CRASHED 1.5 s later with restart_delay 1 s: one failure, one restart."""
    r = Rig(tmp_path, {**BASE, "defaults": {**BASE.get("defaults", {}), "restart_delay": 1.0}})
    try:
        running(r.hv, "web1")
        await r.start()
        g = r.hv.guests["web1"]
        r.hv._emit(g, "CRASHED", "PANICKED")
        await r.run(1.5)
        assert r.hv.count("start") == 0  # nothing decided before libvirt stopped the guest
        g.state, g.reason = DomainState.SHUTOFF, ShutoffReason.CRASHED
        r.hv._emit(g, "STOPPED", "CRASHED")
        await r.run(30)
        assert r.hv.count("start") == 1
        snap = r.engine.snapshot().guests["web1"]
        assert snap.failures_in_window == 1
        assert dict(snap.restarts) == {"crash": 1}
    finally:
        await r.close()


async def test_a_guest_that_stays_crashed_is_decided_after_the_wait(tmp_path):
    """<on_crash>preserve: no STOPPED follows; the crash is decided after CRASH_STOP_WAIT."""
    from virtwatch.policy.engine import CRASH_STOP_WAIT

    r = Rig(tmp_path, {**BASE, "defaults": {**BASE.get("defaults", {}), "restart_delay": 1.0}})
    try:
        running(r.hv, "web1")
        await r.start()
        r.hv.crash("web1", preserve=True)
        await r.run(CRASH_STOP_WAIT - 1)
        assert r.hv.count("start") == 0
        await r.run(30)
        assert r.engine.snapshot().guests["web1"].failures_in_window == 1
        assert (r.hv.count("destroy"), r.hv.count("start")) == (1, 1)  # a crashed guest is destroyed, then started
    finally:
        await r.close()


@pytest.mark.parametrize("restart_delay", [1, 10])
async def test_io_error_pause_soon_after_our_restart_is_a_failure(tmp_path, restart_delay):
    # seen in the real e2e: a guest with a full disk pauses again ~1 s after our restart, inside
    # own_event_grace of our kill (restart_delay 1). That pause is the guest's failure, not ours:
    # it counts against the budget and the kill/restart loop gives up after limit_burst instead
    # of going on for ever. With restart_delay 10 the next kill's STOPPED is within the grace of
    # both our start and our kill: it is the kill's (ours), never an admin destroy.
    r = Rig(
        tmp_path,
        {
            **BASE,
            "own_event_grace": 5.0,
            "defaults": {**BASE["defaults"], "restart_delay": restart_delay, "restart_backoff": 1},
            "match": [{"glob": "*", "on_io_error": "kill"}],
        },
    )
    try:
        running(r.hv, "db")
        await r.start()
        starts_seen = 0
        r.hv.pause_io_error("db")
        for _ in range(200):  # 100 s of fake time
            await r.run(0.5)
            if r.hv.count("start", "db") > starts_seen and r.hv.guests["db"].state == DomainState.RUNNING:
                starts_seen = r.hv.count("start", "db")
                await r.run(1.0)  # inside own_event_grace of the kill that preceded the start
                r.hv.pause_io_error("db")
        assert [a.kind for a in r.alerts].count("given_up") == 1
        assert r.hv.count("destroy", "db") == 3 and r.hv.count("start", "db") == 3
        causes = [
            (e["event"], e["cause"]) for e in await r.store.events("db") if e["event"] in ("SUSPENDED", "STOPPED")
        ]
        assert causes == [("SUSPENDED", "io_error"), ("STOPPED", "ours")] * 3 + [("SUSPENDED", "io_error")]
    finally:
        await r.close()
