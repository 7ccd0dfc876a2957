"""``console.sqlite``: the crash records of captured consoles.

Its own SQLite code for now (WAL, ``synchronous=NORMAL``, one lock, called from
worker threads); the policy store's opener is to be shared later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..model import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_crashes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    time         REAL NOT NULL,
    guest        TEXT NOT NULL,
    uuid         TEXT NOT NULL DEFAULT '',
    seq          INTEGER NOT NULL DEFAULT 0,
    kind         TEXT NOT NULL,
    event        TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    events       TEXT NOT NULL DEFAULT '[]',
    console_tail TEXT NOT NULL DEFAULT '',
    log_file     TEXT,
    log_tail     TEXT,
    screenshot   TEXT
);
CREATE INDEX IF NOT EXISTS console_crashes_guest ON console_crashes (guest, id);
"""


@dataclasses.dataclass(frozen=True, slots=True)
class CrashRecord:
    """One persisted crash.

    Attributes:
        id: row id. time: wall time of the first event, seconds since the epoch.
        guest, uuid: the guest. seq: the first event's pump sequence number.
        kind, event, detail: the first event (``lifecycle``/``CRASHED``/``PANICKED``).
        events: every coalesced event as ``"kind:EVENT/DETAIL"``.
        console_tail: the ring buffer's last ``crash_lines`` lines.
        log_file, log_tail: the serial's virtlogd log and its last lines (None if none).
        screenshot: path of the screenshot file (None if none was taken).
    """

    id: int
    time: float
    guest: str
    uuid: str
    seq: int
    kind: str
    event: str
    detail: str
    events: list[str]
    console_tail: str
    log_file: str | None
    log_tail: str | None
    screenshot: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


class CrashStore:
    """``console.sqlite``: crash records with console tails (WAL, one
    transaction per write). Thread-safe: every method may run in a worker
    thread (the daemon calls them through ``asyncio.to_thread``).

    Raises ``sqlite3.Error`` on I/O problems.
    """

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        if read_only:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def insert(self, ev: Event, console_tail: str, log_file: str | None, log_tail: str | None,
               screenshot: str | None) -> int:
        """Store a new crash for ``ev``; returns its id."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO console_crashes (time, guest, uuid, seq, kind, event, detail, events, console_tail,"
                " log_file, log_tail, screenshot) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ev.time, ev.name, ev.uuid, ev.seq, ev.kind, ev.event, ev.detail,
                 json.dumps([_event_label(ev)]), console_tail, log_file, log_tail, screenshot))
            return int(cur.lastrowid or 0)

    def update(self, crash_id: int, ev: Event, console_tail: str, log_tail: str | None,
               screenshot: str | None) -> None:
        """Coalesce ``ev`` into crash ``crash_id``: append it to ``events`` and
        refresh the tails (a later read holds at least as much output)."""
        with self._lock:
            row = self._conn.execute("SELECT events, log_tail, screenshot FROM console_crashes WHERE id=?",
                                     (crash_id,)).fetchone()
            if row is None:
                return
            events = [*json.loads(row["events"]), _event_label(ev)]
            self._conn.execute(
                "UPDATE console_crashes SET events=?, console_tail=?, log_tail=?, screenshot=? WHERE id=?",
                (json.dumps(events), console_tail, log_tail if log_tail is not None else row["log_tail"],
                 screenshot or row["screenshot"], crash_id))

    def crashes(self, guest: str | None = None, limit: int = 100) -> list[CrashRecord]:
        """Newest first, at most ``limit``."""
        with self._lock:
            if guest is None:
                rows = self._conn.execute("SELECT * FROM console_crashes ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = self._conn.execute("SELECT * FROM console_crashes WHERE guest=? ORDER BY id DESC LIMIT ?",
                                          (guest, limit))
            return [_record(r) for r in rows.fetchall()]

    def crash(self, guest: str, n: int) -> CrashRecord | None:
        """The ``n``-th most recent crash of ``guest`` (1 = latest), or None."""
        if n < 1:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM console_crashes WHERE guest=? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (guest, n - 1)).fetchone()
        return _record(row) if row is not None else None

    def prune(self, keep: int) -> int:
        """Delete all but the newest ``keep`` records; returns rows deleted."""
        with self._lock:
            cur = self._conn.execute(
                "DELETE FROM console_crashes WHERE id NOT IN (SELECT id FROM console_crashes ORDER BY id DESC LIMIT ?)",
                (keep,))
            return cur.rowcount

    def journal_mode(self) -> str:
        """SQLite journal mode (``wal``)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])


def _event_label(ev: Event) -> str:
    return f"{ev.kind}:{ev.event}/{ev.detail}"


def _record(r: sqlite3.Row) -> CrashRecord:
    return CrashRecord(id=r["id"], time=r["time"], guest=r["guest"], uuid=r["uuid"], seq=r["seq"], kind=r["kind"],
                       event=r["event"], detail=r["detail"], events=json.loads(r["events"]),
                       console_tail=r["console_tail"], log_file=r["log_file"], log_tail=r["log_tail"],
                       screenshot=r["screenshot"])
