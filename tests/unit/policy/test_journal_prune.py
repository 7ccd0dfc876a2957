"""The policy event journal stays bounded: rows past journal_max_age or beyond journal_max_events
are deleted off the event loop, once at start and then on a schedule, and the pruning is logged."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from testkit import until
from virtwatch.alerts.alerter import Alerter
from virtwatch.config import ConfigError, settings_from_mapping
from virtwatch.policy.clock import FakeClock
from virtwatch.policy.config import PolicySettings
from virtwatch.policy.journal import JOURNAL_PRUNE_INTERVAL
from virtwatch.policy.store import Store, prune_journal
from virtwatch.policy.wiring import PolicyRuntime

DAY = 86400.0


def fill(path: Path, times: list[float]) -> None:
    """Append one event row per wall-clock time in ``times`` (seq = position)."""
    s = Store.open(path)
    for i, t in enumerate(times):
        s.record_event(t, i, f"g{i % 3}", "", "lifecycle", "STARTED", "BOOTED")
    s.close()


def seqs(path: Path) -> list[int]:
    """``seq`` of every remaining event row, oldest first (read on a connection of our own)."""
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY id")]
    finally:
        conn.close()


def test_defaults_and_validation() -> None:
    p = PolicySettings()
    assert p.journal_max_age == 30 * DAY and p.journal_max_events == 100_000
    s = settings_from_mapping({"policy": {"journal_max_age": 3600, "journal_max_events": 50}})
    assert s.policy.journal_max_age == 3600.0 and s.policy.journal_max_events == 50
    for bad, path in (({"journal_max_age": 0}, "policy.journal_max_age"),
                      ({"journal_max_age": -5}, "policy.journal_max_age"),
                      ({"journal_max_events": 0}, "policy.journal_max_events"),
                      ({"journal_max_events": "many"}, "policy.journal_max_events")):
        with pytest.raises(ConfigError) as exc:
            settings_from_mapping({"policy": bad})
        assert any(e.startswith(path) for e in exc.value.errors), exc.value.errors


def test_prune_by_age_then_by_count_in_small_batches(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    fill(db, [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0])
    r = prune_journal(db, before=350.0, keep=4, batch=2)   # 3 rows older than 350; then 7 left, keep 4
    assert (r.by_age, r.by_count, r.kept) == (3, 3, 4)
    assert seqs(db) == [6, 7, 8, 9]
    r = prune_journal(db, before=350.0, keep=4, batch=2)
    assert (r.by_age, r.by_count, r.kept) == (0, 0, 4)   # nothing left to do


def test_prune_stops_between_batches_when_asked(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    fill(db, [float(t) for t in range(10)])
    r = prune_journal(db, before=100.0, keep=10, batch=3, stop=lambda: True)
    assert r.by_age == 3 and r.kept == 7   # one batch, then it noticed the stop


def test_prune_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        prune_journal(tmp_path / "missing.db", before=0.0, keep=1)
    assert not (tmp_path / "missing.db").exists()


async def test_runtime_prunes_at_start_and_then_every_interval(tmp_path: Path) -> None:
    clock = FakeClock(start_time=1_800_000_000.0)
    now = clock.time()
    state = tmp_path / "state"
    state.mkdir()
    db = state / "virtwatch.sqlite"
    # 2 rows older than 30 days, then 6 recent ones: max_events 4 drops the 2 oldest recent ones
    fill(db, [now - 40 * DAY, now - 31 * DAY, now - 5, now - 4, now - 3, now - 2, now - 1, now])
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    settings = PolicySettings(enabled=True, journal_max_age=30 * DAY, journal_max_events=4)
    rt = PolicyRuntime(settings, str(state), lambda: None, Alerter(settings_from_mapping({}).alerts,
                                                                   CollectorRegistry()),
                       str(boot_id), clock=clock)
    with capture_logs() as logs:
        await rt.start()
        try:
            await until(lambda: any(e["event"] == "policy_journal_pruned" for e in logs), 5.0, "first prune")
            first = next(e for e in logs if e["event"] == "policy_journal_pruned")
            assert (first["deleted_by_age"], first["deleted_by_count"], first["kept"]) == (2, 2, 4)
            assert first["log_level"] == "info"
            assert seqs(db) == [4, 5, 6, 7]

            # a day later the 4 kept rows are 1 day old and 3 new ones arrive: count prunes again
            await clock.advance(DAY - JOURNAL_PRUNE_INTERVAL)
            # the prunes due meanwhile (nothing to delete) are over once the pruner sleeps again
            await until(lambda: (clock.next_deadline() or 0) > clock.monotonic(), 5.0, "pruner asleep")
            await rt.store.record_event(clock.time(), 8, "g0", "", "lifecycle", "STARTED", "BOOTED")
            await rt.store.record_event(clock.time(), 9, "g0", "", "lifecycle", "STARTED", "BOOTED")
            await rt.store.record_event(clock.time(), 10, "g0", "", "lifecycle", "STARTED", "BOOTED")
            assert len([e for e in logs if e["event"] == "policy_journal_pruned"]) == 1  # not due yet
            await clock.advance(JOURNAL_PRUNE_INTERVAL)
            await until(lambda: len([e for e in logs if e["event"] == "policy_journal_pruned"]) == 2, 5.0,
                        "second prune")
            second = [e for e in logs if e["event"] == "policy_journal_pruned"][1]
            assert (second["deleted_by_age"], second["deleted_by_count"], second["kept"]) == (0, 3, 4)
            assert seqs(db) == [7, 8, 9, 10]
        finally:
            await rt.stop()
    await asyncio.sleep(0)


async def test_a_prune_that_fails_is_logged_and_retried(tmp_path: Path) -> None:
    from virtwatch.policy.journal import JournalPruner

    clock = FakeClock()
    pruner = JournalPruner(tmp_path / "not-there.sqlite", 30 * DAY, 10, clock)
    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(pruner.run())
        try:
            await until(lambda: any(e["event"] == "policy_journal_prune_failed" for e in logs), 5.0)
            await clock.advance(JOURNAL_PRUNE_INTERVAL)
            await until(lambda: len([e for e in logs if e["event"] == "policy_journal_prune_failed"]) == 2, 5.0)
            assert not task.done()  # the schedule goes on
        finally:
            pruner.stop()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    failed = next(e for e in logs if e["event"] == "policy_journal_prune_failed")
    assert failed["log_level"] == "warning" and "unable to open database file" in failed["error"]
