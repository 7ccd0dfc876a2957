"""Console capture building blocks: ring buffer, line splitting, XML parsing,
crash store, crash-event selection. No libvirt daemon needed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from virtwatch.config import load_settings
from virtwatch.console.capture import is_crash_event
from virtwatch.console.crashstore import CrashStore
from virtwatch.console.devices import parse_console_devices, read_file_tail
from virtwatch.console.ring import RingBuffer, text_lines
from virtwatch.console.settings import ConsoleSettings
from virtwatch.model import Event


def ev(kind: str, event: str, detail: str = "", name: str = "g1", seq: int = 1, t: float = 1000.0,
       source: str = "domain") -> Event:
    return Event(time=t, seq=seq, source=source, kind=kind, name=name, uuid="u-" + name, event=event, detail=detail)


def test_ring_keeps_the_newest_bytes_and_counts_drops() -> None:
    r = RingBuffer(10)
    r.append(b"abcdef")
    r.append(b"ghijkl")
    assert r.data() == b"cdefghijkl"
    assert (r.total, r.dropped, len(r)) == (12, 2, 10)
    r.append(b"0123456789ABCDEF")  # larger than the ring: only its tail stays
    assert r.data() == b"6789ABCDEF"
    assert (r.total, r.dropped) == (28, 18)


def test_ring_memory_is_bounded_under_a_flood() -> None:
    r = RingBuffer(64 * 1024)
    chunk = b"x" * 4096 + b"\n"
    for _ in range(2600):  # ~10.7 MB
        r.append(chunk)
    assert len(r) == 64 * 1024
    assert r.total == 2600 * 4097
    assert r.dropped == r.total - 64 * 1024


def test_ring_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        RingBuffer(0)


def test_text_lines_normalises_crlf_keeps_partial_and_limits() -> None:
    data = b"one\r\ntwo\r\nthree\rfour\npart"
    assert text_lines(data, 10) == ["one", "two", "three", "four", "part"]
    assert text_lines(data, 2) == ["four", "part"]
    assert text_lines(b"a\nb\n", 5) == ["a", "b"]
    assert text_lines(b"\xffok\n", 1) == ["\ufffdok"]
    assert text_lines(b"a\n", 0) == []
    assert text_lines(b"", 3) == []


def test_parse_console_devices_reads_serial_log_and_graphics() -> None:
    xml = ("<domain><devices><serial type='pty'><log file='/var/log/s.log' append='off'/>"
           "<target port='0'/></serial><console type='pty'><target type='serial'/></console>"
           "<graphics type='vnc' port='-1'/></devices></domain>")
    d = parse_console_devices(xml)
    assert d.log_file == "/var/log/s.log"
    assert d.graphics is True
    bare = parse_console_devices("<domain><devices><serial type='pty'/></devices></domain>")
    assert bare.log_file is None and bare.graphics is False
    cons = parse_console_devices("<domain><devices><console type='pty'><log file='/c.log'/></console>"
                                 "</devices></domain>")
    assert cons.log_file == "/c.log"


def test_read_file_tail(tmp_path: Path) -> None:
    p = tmp_path / "serial.log"
    p.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    tail = read_file_tail(str(p), 30)
    assert len(tail) == 30
    assert text_lines(tail, 2) == ["line 998", "line 999"]


@pytest.mark.parametrize("kind,event,detail,want", [
    ("lifecycle", "CRASHED", "PANICKED", True),
    ("lifecycle", "STOPPED", "CRASHED", True),
    ("lifecycle", "STOPPED", "FAILED", True),
    ("lifecycle", "STOPPED", "DESTROYED", False),
    ("lifecycle", "STOPPED", "SHUTDOWN", False),
    ("lifecycle", "STARTED", "BOOTED", False),
    ("watchdog", "WATCHDOG", "PAUSE", True),
    ("io_error", "IO_ERROR", "enospc", False),
])
def test_crash_events(kind: str, event: str, detail: str, want: bool) -> None:
    assert is_crash_event(ev(kind, event, detail)) is want


def test_network_events_are_never_crashes() -> None:
    assert is_crash_event(ev("network_lifecycle", "STOPPED", "CRASHED", source="network")) is False


def test_crash_store_insert_coalesce_nth_and_prune(tmp_path: Path) -> None:
    path = tmp_path / "state" / "console.sqlite"
    store = CrashStore(path)
    assert store.journal_mode() == "wal"
    a = store.insert(ev("lifecycle", "CRASHED", "PANICKED", seq=1, t=10.0), "l1\nl2", "/x.log", "old", None)
    store.update(a, ev("lifecycle", "STOPPED", "CRASHED", seq=2, t=11.0), "l1\nl2\nl3", None, "/shot.img (image/x)")
    b = store.insert(ev("watchdog", "WATCHDOG", "RESET", seq=3, t=50.0), "w", None, None, None)
    store.insert(ev("lifecycle", "STOPPED", "FAILED", name="other", seq=4, t=60.0), "o", None, None, None)
    latest = store.crash("g1", 1)
    first = store.crash("g1", 2)
    assert latest is not None and first is not None
    assert latest.id == b and latest.events == ["watchdog:WATCHDOG/RESET"]
    assert first.id == a
    assert first.events == ["lifecycle:CRASHED/PANICKED", "lifecycle:STOPPED/CRASHED"]
    assert first.console_tail == "l1\nl2\nl3"
    assert first.log_tail == "old"  # kept: the later update had no log tail
    assert first.screenshot == "/shot.img (image/x)"
    assert store.crash("g1", 3) is None and store.crash("g1", 0) is None
    assert [r.guest for r in store.crashes()] == ["other", "g1", "g1"]
    assert store.prune(2) == 1
    assert [r.id for r in store.crashes("g1")] == [b]
    store.close()
    ro = CrashStore(path, read_only=True)
    assert ro.crash("other", 1).console_tail == "o"
    with pytest.raises(sqlite3.OperationalError):
        ro.insert(ev("watchdog", "WATCHDOG", "RESET"), "x", None, None, None)
    ro.close()


def test_console_settings_in_config_and_validation() -> None:
    s = load_settings(None, {"console.enabled": True, "console.guests": ["web-*", "db1"], "console.buffer_kib": 8})
    assert s.console.enabled and s.console.guests == ("web-*", "db1") and s.console.buffer_kib == 8
    # the feature is on, but nothing is captured unless a guest opts in (policy or guests globs)
    assert ConsoleSettings().enabled is True and ConsoleSettings().guests == ()
    assert ConsoleSettings().crash_lines == 200
    assert ConsoleSettings().alert_lines == 20 and ConsoleSettings().force is False
    from virtwatch.config import ConfigError
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"console.buffer_kib": 0, "console.bogus": 1})
    assert any(e.startswith("console.buffer_kib") for e in err.value.errors)
    assert "console.bogus: unknown key" in err.value.errors
