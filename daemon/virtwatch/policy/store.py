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
- Opened by :func:`virtwatch.infra.sqlite.open_database`: schema version in
  ``PRAGMA user_version`` (:data:`MIGRATIONS`). A database that is corrupt or
  has a newer schema is renamed ``<path>.corrupt-<unix time>`` (WAL/SHM files
  too), a loud warning is logged, and a fresh database is created: never a crash.

:class:`Store` is synchronous and confined to the thread that opened it. The
daemon never calls it on the event loop: :class:`AsyncStore` gives the loop
the same operations, run one at a time on a thread that owns the connection.
:func:`prune_journal` opens a connection of its own, for a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import sqlite3
import time as _time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import structlog

from ..infra.sqlite import DatabaseUnusable, open_database
from .budget import History
from .model import GuestState

T = TypeVar("T")


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

#: Version 2: ``guests.migrated_to`` (NULL: not migrated away; '' : to a host libvirt did not name).
_MIGRATED_TO = "ALTER TABLE guests ADD COLUMN migrated_to TEXT"

#: ``MIGRATIONS[i]`` takes the schema from version i to i + 1 (:func:`~virtwatch.infra.sqlite.open_database`).
MIGRATIONS = (_SCHEMA, _MIGRATED_TO)
SCHEMA_VERSION = len(MIGRATIONS)


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


#: The database cannot be used even after recreating it (e.g. directory not writable).
StoreError = DatabaseUnusable


class Store:
    """SQLite-backed policy state. Open with :meth:`Store.open`.

    ``clock`` returns wall-clock seconds (for ``updated`` columns and the
    ``.corrupt-<ts>`` suffix). ``on_commit`` is called on the committing thread
    after every transaction (:meth:`transaction`) commits; it must not raise.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float],
                 on_commit: Callable[[], None] | None = None) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        self._on_commit = on_commit
        self.moved_aside: Path | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], clock: Callable[[], float] = _time.time,
             logger: Any = None, on_commit: Callable[[], None] | None = None) -> Store:
        """Open or create the database at ``path`` (``":memory:"`` allowed), through
        :func:`~virtwatch.infra.sqlite.open_database` (WAL, ``synchronous=FULL``).

        A corrupt or newer-schema file is moved aside (``<path>.corrupt-<ts>``)
        with a warning and replaced by a fresh one. Raises :class:`StoreError`
        only when even a fresh database cannot be created.
        """
        log = logger or structlog.get_logger("virtwatch.store")
        p = Path(path)
        opened = open_database(p, MIGRATIONS, synchronous="FULL", clock=clock)
        if opened.moved_aside is not None:
            log.warning("store_moved_aside", path=str(p), moved_to=str(opened.moved_aside), reason=opened.reason,
                        msg="policy state database unusable: moved aside, starting with empty state")
        store = cls(opened.conn, p, clock, on_commit)
        store.moved_aside = opened.moved_aside
        return store

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    # -- transactions --------------------------------------------------------

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, on_commit: Callable[[], None] | None) -> None:
            self.conn = conn
            self.on_commit = on_commit

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
                if self.on_commit is not None:
                    self.on_commit()
            else:
                self.conn.execute("ROLLBACK")

    def transaction(self) -> Store._Tx:
        """``with store.transaction() as conn:`` — one atomic transition."""
        return Store._Tx(self._conn, self._on_commit)

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
                          MappingProxyType(json.loads(r["override"])), r["pending_action"], r["migrated_to"])

    def _put_guest(self, conn: sqlite3.Connection, g: GuestState) -> None:
        h = g.history
        conn.execute(
            """INSERT INTO guests (name, uuid, intent, attempt, failures, last_start, last_failure, last_resume,
                   io_resumes, given_up, given_up_reason, next_retry, restarts, was_running, boot_pending, override,
                   updated, pending_action, migrated_to)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(name) DO UPDATE SET uuid=excluded.uuid, intent=excluded.intent, attempt=excluded.attempt,
                   failures=excluded.failures, last_start=excluded.last_start, last_failure=excluded.last_failure,
                   last_resume=excluded.last_resume, io_resumes=excluded.io_resumes, given_up=excluded.given_up,
                   given_up_reason=excluded.given_up_reason, next_retry=excluded.next_retry, restarts=excluded.restarts,
                   was_running=excluded.was_running, boot_pending=excluded.boot_pending, override=excluded.override,
                   updated=excluded.updated, pending_action=excluded.pending_action,
                   migrated_to=excluded.migrated_to""",
            (g.name, g.uuid, g.intent, h.attempt, json.dumps(list(h.failures)), h.last_start, h.last_failure,
             h.last_resume, h.io_resumes, int(h.given_up), h.given_up_reason, h.next_retry,
             json.dumps(dict(h.restarts), sort_keys=True), int(g.was_running), g.boot_pending,
             json.dumps(dict(g.override), sort_keys=True), self._clock(), g.pending_action, g.migrated_to),
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
        """Commit an action's outcome (``ok``, ``failed``, ``timeout``, ``interrupted``...) with the guest's
        new state."""
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
                "INSERT INTO events (time, seq, guest, uuid, kind, event, detail, payload, cause) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
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
            conn.execute("INSERT INTO meta (key, value) VALUES (?,?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def begin_boot(self, boot_id: str, pending: list[GuestState]) -> None:
        """Atomically record ``boot_id`` as handled and mark ``pending`` guests (boot_pending set) for its boot flow."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('boot_id', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (boot_id,))
            for g in pending:
                self._put_guest(conn, g)

    @property
    def schema_version(self) -> int:
        """``PRAGMA user_version`` of the open database."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        """``PRAGMA journal_mode`` (``wal`` for files)."""
        return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])


class AsyncStore:
    """The policy :class:`Store` for the event loop: every call runs on a thread of the store's own.

    That thread owns the SQLite connection (opened there by :meth:`open`) and
    runs the calls one at a time, in the order they were made: transitions
    commit in the order the engine made them, each in its own transaction as
    before, and the loop only awaits the answer, so a commit's fsync
    (``synchronous=FULL``) never stalls it. The engine updates its memory
    first and then awaits the write, so memory and disk agree in order.

    A call once made runs to its end even when the awaiting task is cancelled
    (an engine stop cancels its workers mid-write): SQLite commits or rolls
    back whole transactions, and :meth:`close` runs after every call made
    before it. A call's ``sqlite3.Error`` is raised to its caller, or logged
    (``store_call_failed``) when that caller was cancelled.

    Args:
        path: the database file (``":memory:"`` allowed).
        clock: wall-clock seconds (``updated`` columns, the move-aside suffix).
        logger: structlog logger.
        on_commit: see :class:`Store`; it runs on the store's thread.

    Attributes:
        path: the database file.
        pending: calls made whose answer has not yet reached the loop.
        moved_aside: set by :meth:`open` when an unusable file was replaced.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = _time.time, logger: Any = None,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock
        self._log = logger or structlog.get_logger("virtwatch.store")
        self._on_commit = on_commit
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._store: Store | None = None
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.moved_aside: Path | None = None

    async def open(self) -> None:
        """Open (or create) the database on the store's thread (:meth:`Store.open`); idempotent.
        Raises :class:`StoreError` when not even a fresh database can be created, OSError."""
        if self._store is not None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="virtwatch-policy-store")
        try:
            self._store = await self._run(Store.open, self.path, self._clock, self._log, self._on_commit)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self.moved_aside = self._store.moved_aside

    async def close(self) -> None:
        """Close the connection after every call made before, then let the thread end (idempotent)."""
        executor, store = self._executor, self._store
        self._executor, self._store = None, None
        if executor is None:
            return
        try:
            if store is not None:
                await self._run(store.close, executor=executor)
        finally:
            executor.shutdown(wait=False)

    async def idle(self) -> None:
        """Wait until every call made so far has been answered (``pending == 0``)."""
        await self._idle.wait()

    def _db(self) -> Store:
        if self._store is None:
            raise StoreError(f"{self.path}: the policy store is not open")
        return self._store

    async def _run(self, fn: Callable[..., T], *args: Any,
                   executor: concurrent.futures.ThreadPoolExecutor | None = None) -> T:
        executor = executor or self._executor
        if executor is None:  # never the loop's default executor: one thread must own the connection
            raise StoreError(f"{self.path}: the policy store is not open")
        fut = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        self.pending += 1
        self._idle.clear()
        fut.add_done_callback(self._answered)
        try:
            return await asyncio.shield(fut)  # a cancelled caller leaves the call to finish
        except asyncio.CancelledError:
            fut.add_done_callback(self._orphan_done)
            raise

    def _answered(self, _fut: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._idle.set()

    def _orphan_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._log.error("store_call_failed", path=str(self.path), error=repr(fut.exception()),
                            msg="a policy store call whose caller was cancelled failed")

    # The operations: each is :class:`Store`'s, run on the store's thread.

    async def load_guests(self) -> dict[str, GuestState]:
        """See :meth:`Store.load_guests`."""
        return await self._run(self._db().load_guests)

    async def get_guest(self, name: str) -> GuestState | None:
        """See :meth:`Store.get_guest`."""
        return await self._run(self._db().get_guest, name)

    async def save_guest(self, guest: GuestState, event_id: int | None = None, decision: str | None = None) -> None:
        """See :meth:`Store.save_guest`."""
        await self._run(self._db().save_guest, guest, event_id, decision)

    async def save_guests(self, guests: list[GuestState]) -> None:
        """See :meth:`Store.save_guests`."""
        await self._run(self._db().save_guests, guests)

    async def delete_guest(self, name: str) -> None:
        """See :meth:`Store.delete_guest`."""
        await self._run(self._db().delete_guest, name)

    async def begin_action(self, guest: GuestState, action: str, reason: str, mode: str = "enforce") -> int:
        """See :meth:`Store.begin_action`: committed when this returns (intent before act)."""
        return await self._run(self._db().begin_action, guest, action, reason, mode)

    async def finish_action(self, action_id: int, result: str, detail: str = "",
                            guest: GuestState | None = None) -> None:
        """See :meth:`Store.finish_action`."""
        await self._run(self._db().finish_action, action_id, result, detail, guest)

    async def interrupted_actions(self) -> list[ActionRow]:
        """See :meth:`Store.interrupted_actions`."""
        return await self._run(self._db().interrupted_actions)

    async def actions(self, guest: str | None = None, limit: int = 100) -> list[ActionRow]:
        """See :meth:`Store.actions`."""
        return await self._run(self._db().actions, guest, limit)

    async def record_event(self, time: float, seq: int, guest: str, uuid: str, kind: str, event: str, detail: str,
                           payload: Mapping[str, Any] | None = None, cause: str | None = None) -> int:
        """See :meth:`Store.record_event`."""
        return await self._run(self._db().record_event, time, seq, guest, uuid, kind, event, detail, payload, cause)

    async def record_transition(self, guest: GuestState, time: float, seq: int, kind: str, event: str, detail: str,
                                payload: Mapping[str, Any] | None, cause: str | None, decision: str | None) -> int:
        """See :meth:`Store.record_transition`."""
        return await self._run(self._db().record_transition, guest, time, seq, kind, event, detail, payload, cause,
                               decision)

    async def events(self, guest: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """See :meth:`Store.events`."""
        return await self._run(self._db().events, guest, limit)

    async def get_meta(self, key: str) -> str | None:
        """See :meth:`Store.get_meta`."""
        return await self._run(self._db().get_meta, key)

    async def set_meta(self, key: str, value: str) -> None:
        """See :meth:`Store.set_meta`."""
        await self._run(self._db().set_meta, key, value)

    async def begin_boot(self, boot_id: str, pending: list[GuestState]) -> None:
        """See :meth:`Store.begin_boot`."""
        await self._run(self._db().begin_boot, boot_id, pending)


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
    store's belongs to the store's own thread), never creates the file, and
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
