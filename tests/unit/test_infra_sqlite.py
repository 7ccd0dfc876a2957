"""The shared SQLite opener: fresh files, step-by-step migrations, unusable files moved aside, read-only opens."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from virtwatch.infra.sqlite import DatabaseUnusable, MigrationFailed, move_aside, open_database

V1 = "CREATE TABLE t (a INTEGER); CREATE INDEX t_a ON t (a)"
V2 = "ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT 'x'"


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def test_a_fresh_file_gets_every_step_wal_and_the_synchronous_level(tmp_path: Path) -> None:
    opened = open_database(tmp_path / "sub" / "x.db", (V1, V2), synchronous="NORMAL")
    c = opened.conn
    assert (opened.moved_aside, opened.reason) == (None, "")
    assert c.execute("PRAGMA user_version").fetchone()[0] == 2
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert columns(c, "t") == ["a", "b"]
    assert c.isolation_level is None and c.row_factory is sqlite3.Row
    c.close()


def test_an_older_file_gets_only_the_steps_it_lacks(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    c = open_database(p, (V1,)).conn
    c.execute("INSERT INTO t (a) VALUES (7)")
    c.close()
    c = open_database(p, (V1, V2)).conn   # V1 again would fail: t exists
    assert c.execute("PRAGMA user_version").fetchone()[0] == 2
    assert [tuple(r) for r in c.execute("SELECT a, b FROM t")] == [(7, "x")]
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default
    c.close()


def test_a_failing_migration_leaves_the_file_at_its_old_version(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    open_database(p, (V1,)).conn.close()
    with pytest.raises(MigrationFailed, match="from schema version 1 to 2 failed"):
        open_database(p, (V1, "ALTER TABLE nope ADD COLUMN c"))
    c = sqlite3.connect(p)
    assert c.execute("PRAGMA user_version").fetchone()[0] == 1
    c.close()
    assert sorted(f.name for f in tmp_path.iterdir() if ".corrupt-" in f.name) == []


def test_a_newer_schema_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE future (z)")
    c.execute("PRAGMA user_version=5")
    c.commit()
    c.close()
    opened = open_database(p, (V1, V2), clock=lambda: 1234.9)
    assert opened.moved_aside == tmp_path / "x.db.corrupt-1234"
    assert opened.reason == "schema version 5 is newer than this virtwatch's 2"
    assert opened.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    old = sqlite3.connect(opened.moved_aside)
    assert old.execute("PRAGMA user_version").fetchone()[0] == 5
    old.close()
    opened.conn.close()


def test_garbage_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    p.write_bytes(b"not sqlite " * 500)
    opened = open_database(p, (V1,), clock=lambda: 99.0)
    assert opened.reason == "not a usable SQLite database: file is not a database"
    aside = tmp_path / "x.db.corrupt-99"
    assert opened.moved_aside == aside and aside.read_bytes().startswith(b"not sqlite")
    opened.conn.execute("INSERT INTO t (a) VALUES (1)")
    opened.conn.close()


def test_move_aside_takes_wal_and_shm_along_and_never_overwrites(tmp_path: Path) -> None:
    for i in range(3):
        for name in ("x.db", "x.db-wal", "x.db-shm"):
            (tmp_path / name).write_text(f"{name} {i}")
        assert move_aside(tmp_path / "x.db", clock=lambda: 50.0).name == ("x.db.corrupt-50", "x.db.corrupt-50-1",
                                                                         "x.db.corrupt-50-2")[i]
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "x.db.corrupt-50", "x.db.corrupt-50-1", "x.db.corrupt-50-1-shm", "x.db.corrupt-50-1-wal",
        "x.db.corrupt-50-2", "x.db.corrupt-50-2-shm", "x.db.corrupt-50-2-wal", "x.db.corrupt-50-shm",
        "x.db.corrupt-50-wal"]
    assert (tmp_path / "x.db.corrupt-50-1-wal").read_text() == "x.db-wal 1"


def test_an_unwritable_place_raises_and_moves_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    with pytest.raises(OSError):   # the directory cannot be created
        open_database(tmp_path / "file" / "x.db", (V1,))
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(DatabaseUnusable):
        open_database(tmp_path / "dir.db", (V1,))  # only a file is moved aside, never a directory
    assert sorted(f.name for f in tmp_path.iterdir()) == ["dir.db", "file"]


def test_memory_database_and_bad_arguments() -> None:
    c = open_database(":memory:", (V1,)).conn
    assert c.execute("PRAGMA user_version").fetchone()[0] == 1
    c.close()
    with pytest.raises(ValueError, match="synchronous must be one of"):
        open_database(":memory:", (V1,), synchronous="FULL; DROP TABLE t")
    with pytest.raises(ValueError):
        open_database(":memory:", (V1,), read_only=True)


def test_read_only_reads_and_never_creates_migrates_or_moves(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    with pytest.raises(DatabaseUnusable):
        open_database(p, (V1,), read_only=True)
    assert not p.exists()
    w = open_database(p, (V1,)).conn
    w.execute("INSERT INTO t (a) VALUES (3)")
    r = open_database(p, (V1,), read_only=True).conn
    assert [row["a"] for row in r.execute("SELECT a FROM t")] == [3]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        r.execute("INSERT INTO t (a) VALUES (4)")
    r.close()
    with pytest.raises(DatabaseUnusable, match="schema version 1 is newer than this virtwatch's 0"):
        open_database(p, (), read_only=True)
    w.close()
    p.write_bytes(b"garbage " * 600)
    r = None
    with pytest.raises(DatabaseUnusable, match="not a database"):
        r = open_database(p, (V1,), read_only=True).conn
    assert r is None and p.read_bytes().startswith(b"garbage")
