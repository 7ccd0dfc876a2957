"""ConsoleCapture against an injected fake connection (the libvirt port):
attach, polling, EOF/takeover/busy handling, crash records, tail, HTTP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from testkit import until
from virtwatch.cli.console_log import console_log_main
from virtwatch.config import ConfigError, load_settings
from virtwatch.console.capture import ConsoleCapture
from virtwatch.console.settings import ConsoleSettings
from virtwatch.metrics.http import ConsoleAPI
from virtwatch.metrics.instruments import Instruments
from virtwatch.model import Event
from virtwatch.virt.calls import Calls

RUNNING, SHUTOFF = libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_SHUTOFF


def lv_error(code: int) -> libvirt.libvirtError:
    err = libvirt.libvirtError(f"fake error {code}")
    err.err = (code, 10, f"fake error {code}", 2, None, None, None, -1, -1)
    return err


class FakeStream:
    """recv() pops scripted items: bytes, -2 (would block), b"" (EOF) or an exception."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.aborted = False
        self.recv_calls = 0

    def recv(self, n: int) -> Any:
        self.recv_calls += 1
        if not self.items:
            return -2
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        if isinstance(item, bytes) and len(item) > n:
            self.items.insert(0, item[n:])
            return item[:n]
        return item

    def abort(self) -> None:
        self.aborted = True


class FakeDomain:
    def __init__(self, conn: FakeConn, name: str) -> None:
        self.conn, self._name = conn, name

    def XMLDesc(self, flags: int) -> str:
        log = f"<log file='{self.conn.log_file}'/>" if self.conn.log_file else ""
        return f"<domain><devices><serial type='pty'>{log}</serial></devices></domain>"

    def UUIDString(self) -> str:
        return "uuid-" + self._name

    def openConsole(self, dev: Any, stream: FakeStream, flags: int) -> None:
        self.conn.opens.append(flags)
        if self.conn.busy:
            raise lv_error(libvirt.VIR_ERR_OPERATION_FAILED)
        stream.items = self.conn.scripts.pop(0) if self.conn.scripts else []


class FakeConn:
    """The subset of virConnect the capture uses; each openConsole takes the next script."""

    def __init__(self, scripts: list[list[Any]], log_file: str | None = None) -> None:
        self.scripts = scripts
        self.log_file = log_file
        self.busy = False
        self.opens: list[int] = []
        self.streams: list[FakeStream] = []

    def lookupByName(self, name: str) -> FakeDomain:
        return FakeDomain(self, name)

    def newStream(self, flags: int) -> FakeStream:
        assert flags == libvirt.VIR_STREAM_NONBLOCK
        s = FakeStream([])
        self.streams.append(s)
        return s


@dataclasses.dataclass
class G:
    name: str
    uuid: str
    state: int


class Guests:
    def __init__(self, *guests: G) -> None:
        self.by = {g.name: g for g in guests}

    def by_name(self, name: str) -> G | None:
        return self.by.get(name)

    def guests(self) -> list[G]:
        return list(self.by.values())


def settings(**kw: Any) -> ConsoleSettings:
    base = dict(enabled=True, guests=("web-*",), poll_interval=0.005, idle_poll_interval=0.02,
                reattach_min_delay=0.01, reattach_max_delay=0.05, settle=0.01, buffer_kib=1)
    base.update(kw)
    return ConsoleSettings(**base)


@pytest.fixture
def calls() -> Iterator[Callable[[], Calls]]:
    """Makes ``Calls`` pools (4 threads, 5 s deadline); all are shut down after the test."""
    made: list[Calls] = []

    def make() -> Calls:
        made.append(Calls(Instruments(CollectorRegistry()), 4, 5.0))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


def event(kind: str, ev: str, detail: str, name: str = "web-1", seq: int = 1, t: float = 100.0) -> Event:
    return Event(time=t, seq=seq, source="domain", kind=kind, name=name, uuid="uuid-" + name, event=ev, detail=detail)


async def test_selection_by_glob_and_selector(calls: Callable[[], Calls]) -> None:
    cap = ConsoleCapture(settings(), calls(), Guests(), None, selector=lambda n: 8 if n == "db" else None)
    assert cap.wants("web-1") and cap.wants("db") and not cap.wants("mail")
    off = ConsoleCapture(settings(enabled=False), calls(), Guests(), None)
    assert not off.wants("web-1")


async def test_attach_reads_into_ring_then_reattaches_after_takeover(tmp_path: Path,
                                                                      calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"hello\r\n", -2, b"world\n", b""], [b"again\n"]])
    guests = Guests(G("web-1", "uuid-web-1", RUNNING), G("mail", "uuid-mail", RUNNING))
    cap = ConsoleCapture(settings(), calls(), guests, tmp_path)
    await cap.start()
    cap.connection_ready(conn)
    # EOF while the guest still runs = someone took the console: re-attach with backoff
    await until(lambda: cap.tail("web-1", 5) == ["hello", "world", "again"])
    st = cap.state("web-1")
    assert st["attaches"] == 2 and st["eofs"] == 1 and st["status"] == "attached"
    assert cap.attached() == ["web-1"]
    assert cap.state("mail") is None  # not selected
    assert conn.opens == [0, 0]  # never FORCE by default
    assert conn.streams[0].aborted
    await cap.stop()
    assert all(s.aborted for s in conn.streams)
    assert cap.attached() == []


async def test_busy_console_backs_off_then_attaches(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"got it\n"]])
    conn.busy = True
    cap = ConsoleCapture(settings(), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    cap.connection_ready(conn)
    # the open is recorded in the worker thread, the status on the loop after it returns
    await until(lambda: len(conn.opens) >= 3 and cap.state("web-1")["status"] == "busy")
    assert cap.state("web-1")["last_error"] == "VIR_ERR_OPERATION_FAILED"
    conn.busy = False
    await until(lambda: cap.tail("web-1") == ["got it"])
    assert cap.state("web-1")["busy"] >= 3
    await cap.stop()


async def test_force_flag_is_passed_only_when_configured(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"x\n"]])
    cap = ConsoleCapture(settings(force=True), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    assert await cap.attach("web-1") == "detached"  # not connected yet
    assert conn.opens == []
    cap.connection_ready(conn)
    await until(lambda: conn.opens)
    assert conn.opens[0] == libvirt.VIR_DOMAIN_CONSOLE_FORCE
    await cap.stop()


async def test_stopped_guest_waits_for_started_event(calls: Callable[[], Calls]) -> None:
    guests = Guests(G("web-1", "uuid-web-1", RUNNING))
    conn = FakeConn([[b"boot 1\n", b""], [b"boot 2\n"]])
    cap = ConsoleCapture(settings(), calls(), guests, None)
    cap.connection_ready(conn)
    await until(lambda: cap.state("web-1")["eofs"] == 1)
    guests.by["web-1"].state = SHUTOFF
    cap.on_event(event("lifecycle", "STOPPED", "SHUTDOWN"))
    await until(lambda: cap.state("web-1")["status"] == "waiting")
    await asyncio.sleep(0.1)
    assert len(conn.opens) == 1  # no attach attempts while the guest is off
    guests.by["web-1"].state = RUNNING
    cap.on_event(event("lifecycle", "STARTED", "BOOTED", seq=2))
    await until(lambda: cap.tail("web-1", 2) == ["boot 1", "boot 2"])
    await cap.stop()


async def test_read_cap_per_tick_bounds_work(calls: Callable[[], Calls]) -> None:
    big = [b"y" * 65536 for _ in range(20)]
    conn = FakeConn([big])
    cap = ConsoleCapture(settings(max_read_per_tick=128 * 1024, buffer_kib=64, guests=("web-1",)), calls(),
                         Guests(), None)  # the guest is unknown: no supervisor, we drive attach/read by hand
    cap.connection_ready(conn)
    assert await cap.attach("web-1") == "attached"
    assert cap.read_available("web-1") == 128 * 1024  # two chunks, then yield to the loop
    assert cap.read_available("web-1") == 128 * 1024
    st = cap.state("web-1")
    assert st["buffered_bytes"] == 64 * 1024 and st["bytes_total"] == 256 * 1024
    await cap.stop()


async def test_stream_error_detaches(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"a\n", lv_error(libvirt.VIR_ERR_RPC)], [b"b\n"]])
    cap = ConsoleCapture(settings(), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    cap.connection_ready(conn)
    await until(lambda: cap.tail("web-1") == ["a", "b"])
    assert cap.state("web-1")["attaches"] == 2
    await cap.stop()


async def test_crash_persists_tail_and_log_file_coalesced(tmp_path: Path, calls: Callable[[], Calls]) -> None:
    serial = tmp_path / "serial.log"
    serial.write_text("".join(f"early {i}\n" for i in range(300)))
    lines = b"".join(b"VWLINE %d\r\n" % i for i in range(250))
    conn = FakeConn([[lines, b"Kernel panic - not syncing\r\n"]], log_file=str(serial))
    cap = ConsoleCapture(settings(buffer_kib=64, crash_lines=200, alert_lines=3), calls(),
                         Guests(G("web-1", "uuid-web-1", RUNNING)), tmp_path)
    await cap.start()
    cap.connection_ready(conn)
    await until(lambda: cap.tail("web-1", 1) == ["Kernel panic - not syncing"])
    assert cap.tail("web-1") == ["VWLINE 248", "VWLINE 249", "Kernel panic - not syncing"]
    cap.on_event(event("lifecycle", "CRASHED", "PANICKED", seq=5, t=100.0))
    await until(lambda: cap.store is not None and len(cap.store.crashes("web-1")) == 1)
    cap.on_event(event("lifecycle", "STOPPED", "CRASHED", seq=6, t=101.0))
    await until(lambda: len(cap.store.crash("web-1", 1).events) == 2)
    rec = cap.store.crash("web-1", 1)
    assert rec.events == ["lifecycle:CRASHED/PANICKED", "lifecycle:STOPPED/CRASHED"]
    tail = rec.console_tail.split("\n")
    assert len(tail) == 200 and tail[0] == "VWLINE 51" and tail[-1] == "Kernel panic - not syncing"
    assert rec.log_file == str(serial)
    assert rec.log_tail.split("\n")[-1] == "early 299" and len(rec.log_tail.split("\n")) == 200
    assert cap.store.crash("web-1", 2) is None  # coalesced into one record
    await cap.stop()


async def test_http_console_endpoint(tmp_path: Path, calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"l1\nl2\nl3\n"]])
    cap = ConsoleCapture(settings(), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), tmp_path)
    await cap.start()
    cap.connection_ready(conn)
    await until(lambda: cap.tail("web-1") == ["l1", "l2", "l3"])
    assert cap.store is None and not (tmp_path / "console.sqlite").exists()  # created at the first crash
    cap.on_event(event("watchdog", "WATCHDOG", "RESET"))
    await until(lambda: cap.store is not None and bool(cap.store.crashes("web-1")))
    app = web.Application()
    ConsoleAPI(cap).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}/api/v1/guests"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/web-1/console?lines=2") as r:
                body = await r.json()
                assert r.status == 200
                assert body["lines"] == ["l2", "l3"]
                assert body["capture"]["status"] == "attached"
                assert body["crashes"][0]["events"] == ["watchdog:WATCHDOG/RESET"]
            async with s.get(f"{base}/web-1/console?crash=1") as r:
                assert r.status == 200
                assert (await r.json())["crash"]["console_tail"] == "l1\nl2\nl3"
            async with s.get(f"{base}/web-1/console?crash=2") as r:
                assert r.status == 404
            async with s.get(f"{base}/nope/console") as r:
                assert r.status == 404
            async with s.get(f"{base}/web-1/console?lines=x") as r:
                assert r.status == 400
        # the console-log CLI shows the daemon's own reason and exits 3 when not captured
        err = io.StringIO()
        args = argparse.Namespace(guest="nope", crash=None, list=False, state_dir=None, lines=5,
                                  url=f"http://127.0.0.1:{port}")
        with contextlib.redirect_stderr(err):
            rc = await asyncio.to_thread(console_log_main, args, "/nonexistent", "/nonexistent/vw.sock")
        assert rc == 3 and "nope: console of 'nope' is not captured (HTTP 404)" in err.getvalue()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = await asyncio.to_thread(console_log_main, argparse.Namespace(**{**vars(args), "guest": "web-1"}),
                                         "/nonexistent", "/nonexistent/vw.sock")
        assert rc == 0 and out.getvalue().splitlines() == ["l1", "l2", "l3"]
    finally:
        await runner.cleanup()
        await cap.stop()


async def test_connection_lost_drops_streams_and_reattaches_on_ready(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"first\n"], [b"second\n"]])
    cap = ConsoleCapture(settings(), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    cap.connection_ready(conn)
    await until(lambda: cap.attached() == ["web-1"])
    cap.connection_lost()
    assert cap.attached() == []
    await asyncio.sleep(0.05)
    assert len(conn.opens) == 1
    cap.connection_ready(conn)
    await until(lambda: cap.tail("web-1") == ["first", "second"])
    await cap.stop()


async def test_policy_selection_sizes_the_ring_and_reselect_attaches_then_releases(calls: Callable[[], Calls]) -> None:
    # selector = the policy's console_buffer (KiB) when capture_console is on, else None
    policy: dict[str, int] = {}
    conn = FakeConn([[b"boot\n"], [b"again\n"]])
    guests = Guests(G("db", "uuid-db", RUNNING))
    cap = ConsoleCapture(settings(guests=()), calls(), guests, None, selector=policy.get)
    await cap.start()
    cap.connection_ready(conn)
    await asyncio.sleep(0.05)
    assert cap.state("db") is None and conn.opens == []   # not selected: never opened
    policy["db"] = 3            # its metadata said capture_console = true, console_buffer = 3
    cap.reselect("db")
    await until(lambda: cap.tail("db", 5) == ["boot"])
    assert cap.state("db")["buffer_capacity_bytes"] == 3 * 1024
    del policy["db"]            # and now it no longer does: let go of the console
    cap.reselect("db")
    await until(lambda: cap.state("db")["status"] == "detached")
    await asyncio.sleep(0.1)
    assert len(conn.opens) == 1 and conn.streams[0].aborted
    assert cap.attached() == []
    await cap.stop()


async def test_alerts_carry_no_console_text_by_default(calls: Callable[[], Calls]) -> None:
    """Issue 13: console lines reach an instant alert only when ``alert_console`` opts in."""
    assert ConsoleSettings().alert_console is False
    conn = FakeConn([[b"login: root\n", b"Password: hunter2\n", b"Kernel panic\n"]])
    cap = ConsoleCapture(settings(), calls(), Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    cap.connection_ready(conn)
    await until(lambda: cap.tail("web-1", 5) == ["login: root", "Password: hunter2", "Kernel panic"])
    assert cap.alert_text("web-1") is None
    await cap.stop()


async def test_opted_in_alert_text_is_redacted_with_the_default_pattern(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"login: root\n", b"Password: hunter2\n", b"export DB_PASSWORD=s3cr3t API_KEY=k1 x\n",
                      b"curl -H 'Authorization: Bearer eyJabc'\n", b"token abc123\n", b"Kernel panic\n"]])
    cap = ConsoleCapture(settings(alert_console=True, alert_lines=6), calls(),
                         Guests(G("web-1", "uuid-web-1", RUNNING)), None)
    cap.connection_ready(conn)
    await until(lambda: len(cap.tail("web-1", 10)) == 6)
    assert cap.alert_text("web-1") == ("login: root\n[redacted]\nexport [redacted] [redacted] x\n"
                                       "curl -H '[redacted]\n[redacted]\nKernel panic")
    assert cap.alert_text("not-captured") is None
    await cap.stop()


async def test_alert_redaction_pattern_is_configurable(calls: Callable[[], Calls]) -> None:
    conn = FakeConn([[b"pin=1234 Password: hunter2\n"]])
    guests = Guests(G("web-1", "uuid-web-1", RUNNING))
    custom = ConsoleCapture(settings(alert_console=True, alert_redact=r"pin=\d+"), calls(), guests, None)
    custom.connection_ready(conn)
    await until(lambda: custom.tail("web-1", 1) == ["pin=1234 Password: hunter2"])
    assert custom.alert_text("web-1") == "[redacted] Password: hunter2"
    await custom.stop()
    assert ConsoleSettings(alert_redact="").redact(["Password: x"]) == ["Password: x"]
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"console.alert_redact": "(unclosed"})
    assert err.value.errors == ["console.alert_redact: invalid regular expression: missing ), unterminated "
                                "subpattern at position 0"]
