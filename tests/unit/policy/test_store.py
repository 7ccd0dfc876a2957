"""SQLite store: round trips, journal, corrupt/newer databases moved aside, SIGKILL mid-transition."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from structlog.testing import capture_logs

from testkit import until
from virtwatch.policy.budget import History
from virtwatch.policy.model import GuestState
from virtwatch.policy.store import SCHEMA_VERSION, AsyncStore, Store, StoreError


class FixedClock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_fresh_file_settings(tmp_path):
    s = Store.open(tmp_path / "sub" / "state.db", clock=FixedClock())
    assert s.schema_version == SCHEMA_VERSION
    assert s.journal_mode() == "wal"
    assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    cols = {r[1] for r in s._conn.execute("PRAGMA table_info(events)")}
    assert "console_tail" in cols
    assert s.moved_aside is None
    s.close()


def test_guest_round_trip(tmp_path):
    p = tmp_path / "state.db"
    s = Store.open(p)
    h = History(failures=(1.0, 2.5), attempt=2, last_start=0.5, given_up=True, given_up_reason="too many",
                next_retry=9.0, restarts={"crash": 3}, io_resumes=1, last_failure=2.5, last_resume=0.7)
    g = GuestState("web1", "u1", "running", h, was_running=True, boot_pending="b1", override={"restart_delay": 3.0},
                   pending_action="restart")
    s.save_guest(g)
    s.close()
    s2 = Store.open(p)
    got = s2.get_guest("web1")
    assert got == g
    assert list(s2.load_guests()) == ["web1"]
    s2.delete_guest("web1")
    assert s2.get_guest("web1") is None


def test_action_journal_intent_before_act(tmp_path):
    s = Store.open(tmp_path / "state.db", clock=FixedClock())
    g = GuestState("a", "u", "running")
    aid = s.begin_action(g.replace(history=History(restarts={"crash": 1})), "start", "restart, attempt 1")
    assert [(r.id, r.action, r.finished) for r in s.interrupted_actions()] == [(aid, "start", None)]
    assert dict(s.get_guest("a").history.restarts) == {"crash": 1}
    s.finish_action(aid, "ok", "", g.replace(intent="running", history=History(restarts={"crash": 1}, last_start=5.0)))
    assert s.interrupted_actions() == []
    row = s.actions("a")[0]
    assert (row.result, row.finished, row.reason) == ("ok", 1_800_000_000.0, "restart, attempt 1")
    assert s.get_guest("a").history.last_start == 5.0


def test_event_journal_and_console_tail(tmp_path):
    s = Store.open(tmp_path / "state.db")
    g = GuestState("a", "u", "running")
    eid = s.record_transition(g, 10.0, 7, "lifecycle", "STOPPED", "CRASHED", {"x": 1}, "crash", "restart: ...")
    s.attach_console_tail(eid, "Kernel panic - not syncing")
    ev = s.events("a")[0]
    assert (ev["seq"], ev["event"], ev["detail"], ev["cause"], ev["decision"]) == (
        7,
        "STOPPED",
        "CRASHED",
        "crash",
        "restart: ...",
    )
    assert json.loads(ev["payload"]) == {"x": 1}
    assert ev["console_tail"] == "Kernel panic - not syncing"
    for i in range(5):
        s.record_event(float(i), i, "b", "", "lifecycle", "STARTED", "BOOTED")
    assert s.prune_events(2) == 4
    assert [e["seq"] for e in s.events()] == [4, 3]


def test_meta_and_boot(tmp_path):
    s = Store.open(tmp_path / "state.db")
    assert s.get_meta("boot_id") is None
    s.begin_boot("boot-1", [GuestState("a", boot_pending="boot-1")])
    assert s.get_meta("boot_id") == "boot-1"
    assert s.get_guest("a").boot_pending == "boot-1"


def test_on_commit_runs_once_per_committed_transaction(tmp_path):
    commits = []
    s = Store.open(tmp_path / "state.db", on_commit=lambda: commits.append(len(s.load_guests())))
    s.save_guest(GuestState("a"))
    aid = s.begin_action(GuestState("b"), "start", "restart")
    s.finish_action(aid, "ok")
    try:
        with s.transaction() as conn:
            conn.execute("DELETE FROM guests")
            raise RuntimeError("rolled back")
    except RuntimeError:
        pass
    assert commits == [1, 2, 2]  # after each commit (the rows are visible), none for the rollback
    s.close()


def test_corrupt_file_moved_aside_with_warning(tmp_path):
    p = tmp_path / "state.db"
    p.write_bytes(b"this is not sqlite at all " * 400)
    with capture_logs() as logs:
        s = Store.open(p, clock=FixedClock(1234.0))
    aside = tmp_path / "state.db.corrupt-1234"
    assert s.moved_aside == aside
    assert aside.read_bytes().startswith(b"this is not sqlite")
    assert logs[0]["event"] == "store_moved_aside" and logs[0]["log_level"] == "warning"
    assert "file is not a database" in logs[0]["reason"]
    s.save_guest(GuestState("a"))
    assert s.get_guest("a") is not None


def test_damaged_pages_moved_aside(tmp_path):
    p = tmp_path / "state.db"
    s = Store.open(p)
    for i in range(300):
        s.save_guest(GuestState(f"guest-{i:04d}", "u" * 36, "running"))
    s.close()
    data = bytearray(p.read_bytes())
    assert len(data) > 8192
    for off in range(4096, len(data), 97):  # smash every page but the header page
        data[off] = (data[off] + 0x5A) % 256
    p.write_bytes(bytes(data))
    with capture_logs() as logs:
        s2 = Store.open(p, clock=FixedClock(99.0))
    assert s2.moved_aside == tmp_path / "state.db.corrupt-99"
    assert s2.load_guests() == {}
    assert logs and logs[0]["event"] == "store_moved_aside"


def test_newer_schema_moved_aside(tmp_path):
    p = tmp_path / "state.db"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE future (x)")
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with capture_logs() as logs:
        s = Store.open(p, clock=FixedClock(77.0))
    assert s.moved_aside == tmp_path / "state.db.corrupt-77"
    assert s.schema_version == SCHEMA_VERSION
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in logs[0]["reason"]
    old = sqlite3.connect(tmp_path / "state.db.corrupt-77")
    assert old.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


CHILD = textwrap.dedent("""
    import sys
    from virtwatch.policy.model import GuestState
    from virtwatch.policy.store import Store
    from virtwatch.policy.budget import History
    s = Store.open(sys.argv[1])
    n = 0
    while True:
        for name in ("a", "b", "c"):
            g = s.get_guest(name) or GuestState(name, intent="running")
            h = g.history
            # one transition: count a restart and open the action, atomically
            g = g.replace(history=h.replace(restarts={"crash": h.restarts.get("crash", 0) + 1}))
            aid = s.begin_action(g, "start", "restart")
            # the libvirt call would happen here
            s.finish_action(aid, "ok", "", g.replace(history=g.history.replace(last_start=float(n))))
            n += 1
            if n == 30:
                print("ready", flush=True)
""")


CHILD_ASYNC = textwrap.dedent("""
    import asyncio, sys
    from virtwatch.policy.model import GuestState
    from virtwatch.policy.store import AsyncStore

    async def main():
        s = AsyncStore(sys.argv[1])
        await s.open()
        n = 0
        while True:
            for name in ("a", "b", "c"):
                g = await s.get_guest(name) or GuestState(name, intent="running")
                h = g.history
                g = g.replace(history=h.replace(restarts={"crash": h.restarts.get("crash", 0) + 1}))
                aid = await s.begin_action(g, "start", "restart")
                await asyncio.sleep(0)  # the libvirt call would happen here
                await s.finish_action(aid, "ok", "", g.replace(history=g.history.replace(last_start=float(n))))
                n += 1
                if n == 30:
                    print("ready", flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("child", [CHILD, CHILD_ASYNC], ids=["store", "async-store"])
def test_sigkill_mid_transition_leaves_consistent_state(tmp_path, child):
    p = tmp_path / "state.db"
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", child, str(p)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        s = Store.open(p)
        assert s.moved_aside is None
        open_rows = s.interrupted_actions()
        assert len(open_rows) <= 1
        guests = s.load_guests()
        for name, g in guests.items():
            journal = [r for r in s.actions(name, limit=1_000_000)]
            # every counted restart has exactly one journal row, finished or open
            assert g.history.restarts.get("crash", 0) == len(journal), name
        # close the interrupted row the way the engine does
        for r in open_rows:
            s.finish_action(r.id, "interrupted")
        assert s.interrupted_actions() == []
        s.close()


async def test_async_store_commits_on_its_thread_in_call_order(tmp_path):
    threads = []
    s = AsyncStore(tmp_path / "state.db", on_commit=lambda: threads.append(threading.get_ident()))
    with pytest.raises(StoreError, match="not open"):
        await s.get_guest("a")
    await s.open()
    await s.open()  # idempotent
    # made one after the other without waiting for the first: they commit in that order
    await asyncio.gather(*(s.save_guest(GuestState("a", intent=intent)) for intent in ("stopped", "held", "running")))
    assert (await s.get_guest("a")).intent == "running"
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert s.pending == 0
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError, match="not open"):
        await s.get_guest("a")


async def test_async_store_makes_a_write_whose_caller_was_cancelled(tmp_path):
    busy, release = threading.Event(), threading.Event()

    def first_commit_waits() -> None:
        if not busy.is_set():
            busy.set()
            release.wait(5.0)

    s = AsyncStore(tmp_path / "state.db", on_commit=first_commit_waits)
    await s.open()
    first = asyncio.ensure_future(s.save_guest(GuestState("a", intent="running")))
    await until(busy.is_set, 5.0, "first commit under way")
    second = asyncio.ensure_future(s.save_guest(GuestState("b", intent="held")))  # queued behind it
    await asyncio.sleep(0)
    second.cancel()  # e.g. the engine stops: its worker is cancelled while the write waits its turn
    with pytest.raises(asyncio.CancelledError):
        await second
    release.set()
    await first
    await s.idle()
    assert s.pending == 0
    await s.close()  # runs after every call made before it
    r = Store.open(tmp_path / "state.db")
    assert {n: g.intent for n, g in r.load_guests().items()} == {"a": "running", "b": "held"}
    r.close()
