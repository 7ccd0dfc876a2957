"""The daemon keeps the policy event journal bounded by default (30 days): rows left
from an earlier run that are older than that are gone once the daemon has started."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from testkit import until
from virtwatch.app import Daemon
from virtwatch.config import settings_from_mapping
from virtwatch.policy.store import Store
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl

DAY = 86400.0


def journal_seqs(db: Path) -> list[int]:
    """``seq`` of every event row, oldest first, read on a connection of our own."""
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY id")]
    finally:
        conn.close()


async def test_old_journal_rows_are_pruned_when_the_daemon_starts(event_impl: ThreadSafeAsyncIOImpl,
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "virtwatch.sqlite"
    now = time.time()
    s = Store.open(db)  # what an earlier run left: two rows past 30 days, two recent ones
    for seq, t in enumerate((now - 45 * DAY, now - 31 * DAY, now - 2 * DAY, now - 60)):
        s.record_event(t, seq, "old-guest", "", "lifecycle", "STOPPED", "CRASHED")
    s.close()
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    settings = settings_from_mapping({
        "libvirt": {"uri": "test:///default"},
        "http": {"listen": "127.0.0.1:0"},
        "log": {"events": False},
        "daemon": {"state_dir": str(state), "socket": str(tmp_path / "run" / "vw.sock"),
                   "boot_id_file": str(boot_id)},
        "policy": {"enabled": True, "boot_settle_timeout": 0.5},  # journal_max_age / _events: defaults
    })
    d = Daemon(settings, event_impl)
    await d.start()
    try:
        await until(lambda: journal_seqs(db)[:2] == [2, 3], 10.0, "rows older than 30 days pruned")
        assert d.settings.policy.journal_max_age == 30 * DAY
    finally:
        await d.stop()
