"""Open a SQLite database of the daemon's own: create, migrate, or move an unusable file aside.

:func:`open_database` is the one way virtwatch opens a database it writes:

- The schema version lives in ``PRAGMA user_version``. ``migrations[i]`` is the
  SQL that takes a database from version ``i`` to ``i + 1``; a new file gets
  every step, an older one the steps it lacks, all in one transaction with the
  version bump.
- A file that is not a database, fails ``PRAGMA quick_check`` or has a newer
  schema (a downgraded virtwatch) is renamed ``<name>.corrupt-<unix time>``
  together with its ``-wal``/``-shm`` files, and a fresh database takes its
  place: the daemon starts with empty state instead of not at all. The caller
  must log that loudly (:attr:`Opened.moved_aside`, :attr:`Opened.reason`).
- Files use WAL; ``synchronous`` chooses what a commit costs (see
  :func:`open_database`).

Everything here blocks: run it, and every use of the connection, in the thread
that owns the connection (``check_same_thread``), never on the event loop.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: The path that opens an in-memory database (never moved aside).
MEMORY = ":memory:"

#: ``PRAGMA synchronous`` values accepted by :func:`open_database`.
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclasses.dataclass(frozen=True, slots=True)
class Opened:
    """What :func:`open_database` opened.

    Attributes:
        conn: the connection, in autocommit mode (``isolation_level=None``: the
            caller writes ``BEGIN IMMEDIATE`` ... ``COMMIT``), rows as :class:`sqlite3.Row`.
        moved_aside: where an unusable file was moved before a fresh one was created, or None.
        reason: why that file was unusable (``"schema version 3 is newer than this virtwatch's 2"``,
            ``"not a usable SQLite database: file is not a database"``...), "" when nothing moved.
    """

    conn: sqlite3.Connection
    moved_aside: Path | None = None
    reason: str = ""


class DatabaseUnusable(OSError):
    """No usable database at the path: even a fresh file cannot be created there (directory
    not writable...), an in-memory database failed, or a read-only open found none."""


class MigrationFailed(DatabaseUnusable):
    """A migration step raised: the file is left as it was (at its old version), not moved aside."""


def open_database(path: str | os.PathLike[str], migrations: Sequence[str], *, synchronous: str = "FULL",
                  check_same_thread: bool = True, busy_timeout: float = 10.0,
                  clock: Callable[[], float] = time.time, read_only: bool = False) -> Opened:
    """Open (or create) the database at ``path`` at schema version ``len(migrations)``.

    Args:
        path: the file (its directory is created) or ``":memory:"``.
        migrations: ``migrations[i]`` takes version ``i`` to ``i + 1``: SQL statements
            separated by ``;`` (so none may contain a ``;`` of its own, e.g. in a trigger).
        synchronous: ``PRAGMA synchronous``, one of :data:`SYNCHRONOUS_LEVELS`. ``FULL``
            fsyncs every commit, which then survives a power cut; ``NORMAL`` (with WAL) may
            lose the last commits on a power cut but never corrupts the file.
        check_same_thread: as :func:`sqlite3.connect`; pass False only for a connection
            that several threads share under a lock of the caller's.
        busy_timeout: seconds a statement waits for another connection's write lock.
        clock: wall-clock seconds, for the ``.corrupt-<unix time>`` suffix.
        read_only: open an existing file with ``mode=ro``: nothing is created, migrated or
            moved aside, and a missing, unreadable or newer file raises.

    Returns:
        :class:`Opened`; ``moved_aside`` is set when an unusable file was replaced.

    Raises:
        DatabaseUnusable: not even a fresh database can be used at ``path`` (read-only:
            none usable there).
        MigrationFailed: a migration step failed (the file keeps its old version).
        OSError: the directory cannot be created, or the unusable file cannot be renamed.
        ValueError: ``synchronous`` is not a known level, or ``read_only`` with ``":memory:"``.
    """
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, not {synchronous!r}")
    p = Path(path)
    memory = str(path) == MEMORY
    if read_only:
        if memory:
            raise ValueError("an in-memory database cannot be opened read-only")
        return Opened(_connect_read_only(p, len(migrations), check_same_thread, busy_timeout))
    try:
        return Opened(_connect(p, memory, migrations, synchronous, check_same_thread, busy_timeout))
    except _Unusable as err:
        if memory or not p.is_file():  # no file to replace: the place itself is the problem
            raise DatabaseUnusable(f"{path}: {err}") from None
        reason = str(err)
    moved = move_aside(p, clock)
    try:
        conn = _connect(p, memory, migrations, synchronous, check_same_thread, busy_timeout)
    except _Unusable as err:
        raise DatabaseUnusable(f"{p}: cannot create a fresh database: {err}") from None
    return Opened(conn, moved, reason)


def move_aside(path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> Path:
    """Rename the file ``path`` to ``<name>.corrupt-<unix time>`` (``-1``, ``-2``... appended when
    taken), its ``-wal`` and ``-shm`` files along with it. Returns the new path. Raises OSError."""
    p = Path(path)
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


class _Unusable(Exception):
    """Internal: this file cannot be used as the database (corrupt, not SQLite, newer schema)."""


def _connect(p: Path, memory: bool, migrations: Sequence[str], synchronous: str, check_same_thread: bool,
             busy_timeout: float) -> sqlite3.Connection:
    if not memory:
        p.parent.mkdir(parents=True, exist_ok=True)
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(str(p), isolation_level=None, timeout=busy_timeout,
                               check_same_thread=check_same_thread)
        conn.row_factory = sqlite3.Row
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(migrations):
            raise _Unusable(f"schema version {version} is newer than this virtwatch's {len(migrations)}")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _Unusable(f"integrity check failed: {check}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as err:
        if conn is not None:
            conn.close()
        raise _Unusable(f"not a usable SQLite database: {err}") from None
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    if version < len(migrations):
        _migrate(conn, migrations, version)
    return conn


def _migrate(conn: sqlite3.Connection, migrations: Sequence[str], version: int) -> None:
    """Run ``migrations[version:]`` and set the new version, all in one transaction."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        for step in range(version, len(migrations)):
            for stmt in migrations[step].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={len(migrations)}")
        conn.execute("COMMIT")
    except sqlite3.Error as err:
        conn.close()  # closing rolls the open transaction back
        raise MigrationFailed(f"migrating from schema version {version} to {len(migrations)} failed: {err}") from None


def _connect_read_only(p: Path, version: int, check_same_thread: bool, busy_timeout: float) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=busy_timeout,
                               check_same_thread=check_same_thread)
        conn.row_factory = sqlite3.Row
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > version:
            raise DatabaseUnusable(f"{p}: schema version {found} is newer than this virtwatch's {version}")
        return conn
    except sqlite3.Error as err:
        if conn is not None:
            conn.close()
        raise DatabaseUnusable(f"{p}: {err}") from None
    except BaseException:
        if conn is not None:
            conn.close()
        raise
