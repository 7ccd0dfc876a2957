"""Persistent policy state in SQLite: guests, boot id, action journal, event journal.

- WAL journal, ``synchronous=FULL``: a committed transition survives power loss.
- One transaction per transition: a guest's new state and the journal row that
  explains it are written together, so a SIGKILL between two statements never
  leaves a counter without its action or the reverse.
- Action journal, intent before act: :meth:`Store.begin_action` commits
  "started action X" (with the guest state that goes with it: counters already
  bumped) *before* the engine calls libvirt; :meth:`Store.finish_action`
  commits the outcome. After a crash, :meth:`Store.interrupted_actions` lists
  the started-but-not-finished ones: the engine checks the guest's real state
  instead of blindly repeating them.
- Schema version in ``PRAGMA user_version``. A database that is corrupt or has
  a newer schema is renamed ``<path>.corrupt-<unix time>`` (WAL/SHM files
  too), a loud warning is logged, and a fresh database is created: never a crash.

The store is synchronous and meant to be called from the event loop thread
(local writes are short); it is not thread-safe. :func:`prune_journal` is the
exception: it opens a connection of its own and is meant for a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time as _time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from .policy.budget import History

SCHEMA_VERSION = 1

#: Event rows deleted per transaction by :func:`prune_journal`: the engine's writes wait for one batch at most.
PRUNE_BATCH = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS guests (
    name            TEXT PRIMARY KEY,
    uuid            TEXT NOT NULL DEFAULT '',
    intent          TEXT NOT NULL DEFAULT 'stopped',
    attempt         INTEGER NOT NULL DEFAULT 0,
    failures        TEXT NOT NULL DEFAULT '[]',
    last_start      REAL,
    last_failure    REAL,
    last_resume     REAL,
    io_resumes      INTEGER NOT NULL DEFAULT 0,
    given_up        INTEGER NOT NULL DEFAULT 0,
    given_up_reason TEXT NOT NULL DEFAULT '',
    next_retry      REAL,
    restarts        TEXT NOT NULL DEFAULT '{}',
    was_running     INTEGER NOT NULL DEFAULT 0,
    boot_pending    TEXT,
    pending_action  TEXT,
    override        TEXT NOT NULL DEFAULT '{}',
    updated         REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS actions (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    guest     TEXT NOT NULL,
    action    TEXT NOT NULL,
    reason    TEXT NOT NULL DEFAULT '',
    mode      TEXT NOT NULL DEFAULT 'enforce',
    started   REAL NOT NULL,
    finished  REAL,
    result    TEXT,
    detail    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS actions_open ON actions (finished) WHERE finished IS NULL;
CREATE INDEX IF NOT EXISTS actions_guest ON actions (guest, id);
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    time         REAL NOT NULL,
    seq          INTEGER NOT NULL DEFAULT 0,
    guest        TEXT NOT NULL,
    uuid         TEXT NOT NULL DEFAULT '',
    kind         TEXT NOT NULL,
    event        TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    payload      TEXT NOT NULL DEFAULT '{}',
    cause        TEXT,
    decision     TEXT,
    console_tail TEXT
);
CREATE INDEX IF NOT EXISTS events_guest ON events (guest, id);
"""


@dataclasses.dataclass(frozen=True, slots=True)
class GuestState:
    """Everything persisted about one guest.

    Attributes:
        name, uuid: identity (name is the key).
        intent: ``running``, ``stopped`` or ``held``.
        history: restart history (:class:`virtwatch.policy.budget.History`).
        was_running: running when the host-shutdown save path ran.
        boot_pending: boot id whose boot flow still has to handle this guest, or None.
        override: runtime policy override (per-guest keys, ``profile``, ``mode``).
        pending_action: action scheduled at ``history.next_retry`` (``restart``/``resume``), or None.
    """

    name: str
    uuid: str = ""
    intent: str = "stopped"
    history: History = History()
    was_running: bool = False
    boot_pending: str | None = None
    override: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    pending_action: str | None = None

    def replace(self, **changes: Any) -> GuestState:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, slots=True)
class ActionRow:
    """One action journal row (``finished``/``result`` None while in flight)."""

    id: int
    guest: str
    action: str
    reason: str
    mode: str
    started: float
    finished: float | None
    result: str | None
    detail: str


class StoreError(Exception):
    """The database cannot be used even after recreating it (e.g. directory not writable)."""


class Store:
    """SQLite-backed policy state. Open with :meth:`Store.open`.

    ``clock`` returns wall-clock seconds (for ``updated`` columns and the
    ``.corrupt-<ts>`` suffix).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        self.moved_aside: Path | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], clock: Callable[[], float] = _time.time,
             logger: Any = None) -> Store:
        """Open or create the database at ``path`` (``":memory:"`` allowed).

        A corrupt or newer-schema file is moved aside (``<path>.corrupt-<ts>``)
        with a warning and replaced by a fresh one. Raises :class:`StoreError`
        only when even a fresh database cannot be created.
        """
        log = logger or structlog.get_logger("virtwatch.store")
        p = Path(path)
        moved: Path | None = None
        try:
            conn = cls._connect(p)
        except _Unusable as err:
            if str(p) == ":memory:":
                raise StoreError(str(err)) from None
            moved = cls._move_aside(p, clock)
            log.warning("store_moved_aside", path=str(p), moved_to=str(moved), reason=str(err),
                        msg="policy state database unusable: moved aside, starting with empty state")
            try:
                conn = cls._connect(p)
            except (_Unusable, sqlite3.Error, OSError) as err2:
                raise StoreError(f"{p}: cannot create a fresh database: {err2}") from None
        store = cls(conn, p, clock)
        store.moved_aside = moved
        return store

    @staticmethod
    def _connect(p: Path) -> sqlite3.Connection:
        conn = None
        try:
            if str(p) != ":memory:":
                p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(p), isolation_level=None, timeout=10.0)
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _Unusable(f"schema version {version} is newer than this virtwatch's {SCHEMA_VERSION}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Unusable(f"integrity check failed: {check}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            return conn
        except sqlite3.DatabaseError as err:
            if conn is not None:
                conn.close()
            raise _Unusable(f"not a usable SQLite database: {err}") from None
        except _Unusable:
            if conn is not None:
                conn.close()
            raise

    @staticmethod
    def _move_aside(p: Path, clock: Callable[[], float]) -> Path:
        target = p.with_name(f"{p.name}.corrupt-{int(clock())}")
        n = 1
        while target.exists():
            target = p.with_name(f"{p.name}.corrupt-{int(clock())}-{n}")
            n += 1
        os.replace(p, target)
        for suffix in ("-wal", "-shm"):
            side = p.with_name(p.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        return target

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    # -- transactions --------------------------------------------------------

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")

    def transaction(self) -> Store._Tx:
        """``with store.transaction() as conn:`` — one atomic transition."""
        return Store._Tx(self._conn)

    # -- guests --------------------------------------------------------------

    @staticmethod
    def _row_to_guest(r: sqlite3.Row) -> GuestState:
        h = History(
            failures=tuple(json.loads(r["failures"])),
            attempt=r["attempt"],
            last_start=r["last_start"],
            given_up=bool(r["given_up"]),
            given_up_reason=r["given_up_reason"],
            next_retry=r["next_retry"],
            restarts=MappingProxyType(json.loads(r["restarts"])),
            io_resumes=r["io_resumes"],
            last_failure=r["last_failure"],
            last_resume=r["last_resume"],
        )
        return GuestState(r["name"], r["uuid"], r["intent"], h, bool(r["was_running"]), r["boot_pending"],
                          MappingProxyType(json.loads(r["override"])), r["pending_action"])

    def _put_guest(self, conn: sqlite3.Connection, g: GuestState) -> None:
        h = g.history
        conn.execute(
            """INSERT INTO guests (name, uuid, intent, attempt, failures, last_start, last_failure, last_resume,
                   io_resumes, given_up, given_up_reason, next_retry, restarts, was_running, boot_pending, override, updated,
                   pending_action)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(name) DO UPDATE SET uuid=excluded.uuid, intent=excluded.intent, attempt=excluded.attempt,
                   failures=excluded.failures, last_start=excluded.last_start, last_failure=excluded.last_failure,
                   last_resume=excluded.last_resume, io_resumes=excluded.io_resumes, given_up=excluded.given_up,
                   given_up_reason=excluded.given_up_reason, next_retry=excluded.next_retry, restarts=excluded.restarts,
                   was_running=excluded.was_running, boot_pending=excluded.boot_pending, override=excluded.override,
                   updated=excluded.updated, pending_action=excluded.pending_action""",
            (g.name, g.uuid, g.intent, h.attempt, json.dumps(list(h.failures)), h.last_start, h.last_failure,
             h.last_resume, h.io_resumes, int(h.given_up), h.given_up_reason, h.next_retry,
             json.dumps(dict(h.restarts), sort_keys=True), int(g.was_running), g.boot_pending,
             json.dumps(dict(g.override), sort_keys=True), self._clock(), g.pending_action),
        )

    def load_guests(self) -> dict[str, GuestState]:
        """Every persisted guest, by name."""
        return {r["name"]: self._row_to_guest(r) for r in self._conn.execute("SELECT * FROM guests ORDER BY name")}

    def get_guest(self, name: str) -> GuestState | None:
        """One guest's persisted state, or None."""
        r = self._conn.execute("SELECT * FROM guests WHERE name=?", (name,)).fetchone()
        return self._row_to_guest(r) if r else None

    def save_guest(self, guest: GuestState, event_id: int | None = None, decision: str | None = None) -> None:
        """Persist one guest transition (optionally annotating event ``event_id`` with the decision) atomically."""
        with self.transaction() as conn:
            self._put_guest(conn, guest)
            if event_id is not None and decision is not None:
                conn.execute("UPDATE events SET decision=? WHERE id=?", (decision, event_id))

    def save_guests(self, guests: list[GuestState]) -> None:
        """Persist several guests in one transaction (boot flow, save path)."""
        with self.transaction() as conn:
            for g in guests:
                self._put_guest(conn, g)

    def delete_guest(self, name: str) -> None:
        """Forget a guest (undefined)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM guests WHERE name=?", (name,))

    # -- action journal -------------------------------------------------------

    def begin_action(self, guest: GuestState, action: str, reason: str, mode: str = "enforce") -> int:
        """Intent before act: commit the guest's new state and an open action row together. Returns the row id."""
        with self.transaction() as conn:
            self._put_guest(conn, guest)
            cur = conn.execute("INSERT INTO actions (guest, action, reason, mode, started) VALUES (?,?,?,?,?)",
                               (guest.name, action, reason, mode, self._clock()))
            return int(cur.lastrowid)

    def finish_action(self, action_id: int, result: str, detail: str = "", guest: GuestState | None = None) -> None:
        """Commit an action's outcome (``ok``, ``failed``, ``timeout``, ``interrupted``...) with the guest's new state."""
        with self.transaction() as conn:
            conn.execute("UPDATE actions SET finished=?, result=?, detail=? WHERE id=? AND finished IS NULL",
                         (self._clock(), result, detail, action_id))
            if guest is not None:
                self._put_guest(conn, guest)

    @staticmethod
    def _action(r: sqlite3.Row) -> ActionRow:
        return ActionRow(r["id"], r["guest"], r["action"], r["reason"], r["mode"], r["started"], r["finished"],
                         r["result"], r["detail"])

    def interrupted_actions(self) -> list[ActionRow]:
        """Actions started but never finished (the daemon died in between), oldest first."""
        return [self._action(r) for r in self._conn.execute("SELECT * FROM actions WHERE finished IS NULL ORDER BY id")]

    def actions(self, guest: str | None = None, limit: int = 100) -> list[ActionRow]:
        """Most recent actions (all guests or one), newest first."""
        if guest is None:
            rows = self._conn.execute("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._conn.execute("SELECT * FROM actions WHERE guest=? ORDER BY id DESC LIMIT ?", (guest, limit))
        return [self._action(r) for r in rows]

    # -- event journal ---------------------------------------------------------

    def record_event(self, time: float, seq: int, guest: str, uuid: str, kind: str, event: str, detail: str,
                     payload: Mapping[str, Any] | None = None, cause: str | None = None) -> int:
        """Append one event row (``console_tail`` NULL until the console feature attaches text). Returns its id."""
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO events (time, seq, guest, uuid, kind, event, detail, payload, cause) VALUES (?,?,?,?,?,?,?,?,?)",
                (time, seq, guest, uuid, kind, event, detail, json.dumps(dict(payload or {}), default=str), cause))
            return int(cur.lastrowid)

    def record_transition(self, guest: GuestState, time: float, seq: int, kind: str, event: str, detail: str,
                          payload: Mapping[str, Any] | None, cause: str | None, decision: str | None) -> int:
        """One event and the guest transition it caused, in one transaction. Returns the event row id."""
        with self.transaction() as conn:
            cur = conn.execute(
                """INSERT INTO events (time, seq, guest, uuid, kind, event, detail, payload, cause, decision)
                   VALUES (?,?,?,?,?,?,?,?,?,?)""",
                (time, seq, guest.name, guest.uuid, kind, event, detail, json.dumps(dict(payload or {}), default=str),
                 cause, decision))
            self._put_guest(conn, guest)
            return int(cur.lastrowid)

    def attach_console_tail(self, event_id: int, text: str) -> None:
        """Attach captured console text to an event row."""
        with self.transaction() as conn:
            conn.execute("UPDATE events SET console_tail=? WHERE id=?", (text, event_id))

    def events(self, guest: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent event rows as dicts, newest first."""
        if guest is None:
            rows = self._conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._conn.execute("SELECT * FROM events WHERE guest=? ORDER BY id DESC LIMIT ?", (guest, limit))
        return [dict(r) for r in rows]

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest ``keep`` event rows, on the calling thread. Returns rows deleted.

        The daemon prunes with :func:`prune_journal` in a worker thread instead.
        """
        return _prune(self._conn, None, keep, PRUNE_BATCH, None).by_count

    # -- meta ----------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A meta value (e.g. ``boot_id``), or None."""
        r = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value in its own transaction."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, value))

    def begin_boot(self, boot_id: str, pending: list[GuestState]) -> None:
        """Atomically record ``boot_id`` as handled and mark ``pending`` guests (boot_pending set) for its boot flow."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('boot_id', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (boot_id,))
            for g in pending:
                self._put_guest(conn, g)

    @property
    def schema_version(self) -> int:
        """``PRAGMA user_version`` of the open database."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        """``PRAGMA journal_mode`` (``wal`` for files)."""
        return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])


@dataclasses.dataclass(frozen=True, slots=True)
class JournalPrune:
    """What one :func:`prune_journal` run did: rows deleted by age, then by count, and rows left."""

    by_age: int
    by_count: int
    kept: int


def prune_journal(path: str | os.PathLike[str], before: float, keep: int, batch: int = PRUNE_BATCH,
                  stop: Callable[[], bool] | None = None) -> JournalPrune:
    """Bound the event journal of the database at ``path``: delete the rows whose ``time`` is
    before ``before`` (seconds since the epoch), then all but the newest ``keep`` rows.

    Blocking: run it in a worker thread. It uses a connection of its own (the
    :class:`Store`'s belongs to the loop thread), never creates the file, and
    deletes ``batch`` rows per transaction, so the engine's writes to the same
    (WAL) database wait for one batch at most. ``stop()`` true ends it between
    batches. Raises sqlite3.Error (e.g. the file is missing or locked for over
    10 s) or OSError.
    """
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=rw", uri=True, isolation_level=None,
                           timeout=10.0)
    try:
        # a prune lost to a power cut is simply done again: no fsync per batch needed
        conn.execute("PRAGMA synchronous=NORMAL")
        return _prune(conn, before, keep, batch, stop)
    finally:
        conn.close()


def _prune(conn: sqlite3.Connection, before: float | None, keep: int, batch: int,
           stop: Callable[[], bool] | None) -> JournalPrune:
    """Delete event rows older than ``before`` (None: none by age), then beyond the newest ``keep``,
    in autocommitted batches of ``batch`` rows, oldest first."""
    def drain(where: str, arg: float | int) -> int:
        total = 0
        while True:
            n = conn.execute(f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE {where} "
                             "ORDER BY id LIMIT ?)", (arg, batch)).rowcount
            total += n
            if n < batch or (stop and stop()):
                return total

    by_age = drain("time < ?", before) if before is not None else 0
    by_count = 0
    if not (stop and stop()):
        # the newest row past the ``keep`` newest: it and everything older goes
        row = conn.execute("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,)).fetchone()
        if row is not None:
            by_count = drain("id <= ?", row[0])
    kept = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    return JournalPrune(by_age, by_count, kept)


class _Unusable(Exception):
    """Internal: this file cannot be used as our database."""
