"""The landing page ``/`` in a real headless Chromium (Debian ``chromium``).

virtwatch's Daemon runs in this process on libvirt's test driver (policy enabled, one
guest managed by a ``[[policy.match]]`` rule that also captures its console) with a running,
a paused and an oddly named guest. Chromium (a subprocess) renders ``/`` twice:
``--dump-dom`` gives the DOM after parsing (the guest table with its sparklines and links,
read back with html.parser; every guest's JSON link is then fetched), ``--screenshot`` a PNG
that is decoded here (stdlib zlib) and checked for size, real content and the sparklines'
colours. The page has no JavaScript and loads nothing else (the DOM Chromium built has no
<script>, no src= and no stylesheet link).

Skips only when chromium is missing outside CI; with ``CI=true`` a missing chromium fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest

from testkit import until
from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.metrics.landing import CPU_COLOR, MEMORY_COLOR

WIDTH, HEIGHT = 1400, 700
ODD = "vwland-odd ?#%&"  # characters a URL path or query treats specially (libvirt refuses "/")
CHROMIUM_TIMEOUT = 60.0


def chromium_binary() -> str:
    """Path of Debian's chromium; skip (outside CI) or fail (in CI) without it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "chromium is not installed (Debian package chromium, listed in .ci/apt-packages.txt)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


async def chromium(tmp_path: Path, *args: str) -> bytes:
    """Run headless Chromium once with a fresh profile; return stdout (fail on error or timeout)."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT} s: {cmd}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    return out


class TableParser(HTMLParser):
    """Rows of every <table> (cells as text, an <svg>'s own text left out), per row its links
    (``hrefs``) and its sparklines (``sparks``: stroke colour → polyline count), the page
    <title>, and how many <script> elements there are."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.hrefs: list[list[str]] = []
        self.sparks: list[dict[str, int]] = []
        self.title = ""
        self.scripts = 0
        self._cell: list[str] | None = None
        self._in_title = False
        self._svg = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
            self.hrefs.append([])
            self.sparks.append({})
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "title" and not self._svg:
            self._in_title = True
        elif tag == "script":
            self.scripts += 1
        elif tag == "a" and self.rows:
            self.hrefs[-1].append(a.get("href") or "")
        elif tag == "svg":
            self._svg += 1
        elif tag == "polyline" and self.rows:
            color = a.get("stroke") or ""
            self.sparks[-1][color] = self.sparks[-1].get(color, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "title":
            self._in_title = False
        elif tag == "svg":
            self._svg -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._svg:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert ihdr is not None
    width, height, depth, ctype, _comp, _filt, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"unsupported PNG {ihdr}"
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(x for j in range(0, stride, 4) for x in line[j:j + 3]))
        prev = line
    return width, height, rows


async def test_landing_page_in_headless_chromium(event_impl: Any, make_guests: Any, tmp_path: Path) -> None:
    chromium_binary()
    config = tmp_path / "virtwatch.toml"
    config.write_text(f"""
[libvirt]
uri = "test:///default"
[http]
listen = "127.0.0.1:0"
[stats]
poll_interval = 0.5
[log]
events = false
[daemon]
state_dir = "{tmp_path / 'state'}"
socket = "{tmp_path / 'virtwatch.sock'}"
[policy]
enabled = true
[[policy.match]]
glob = "vwland-run-*"
mode = "dry-run"
capture_console = true
""")
    daemon = Daemon(load_settings(config), event_impl)
    await daemon.start()
    try:
        await daemon.connection.ready.wait()
        running = make_guests("vwland-run")[0]  # after the start: the page shows their events
        paused = make_guests("vwland-pause", persistent=True)[0]
        paused.suspend()
        odd = make_guests(ODD)[0]
        await check_landing_page(daemon, tmp_path, running.name(), paused.name(), odd.name())
    finally:
        await daemon.stop()


def near(pixel: bytes, color: str, tolerance: int = 40) -> bool:
    """Whether an RGB pixel is within ``tolerance`` of ``#rrggbb`` on every channel."""
    want = bytes.fromhex(color.lstrip("#"))
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, want, strict=True))


async def check_landing_page(daemon: Daemon, tmp_path: Path, running: str, paused: str, odd: str) -> None:
    names = {running: libvirt.VIR_DOMAIN_RUNNING, paused: libvirt.VIR_DOMAIN_PAUSED, odd: libvirt.VIR_DOMAIN_RUNNING}
    await until(lambda: all(daemon.guests.by_name(n) is not None and daemon.guests.by_name(n).state == s
                            for n, s in names.items()), 10, "guests seen by the daemon")
    # Three polls: CPU % is a rate between two, and a sparkline needs two of them.
    uuid = daemon.guests.by_name(running).uuid
    await until(lambda: sum(p.cpu_percent is not None for p in daemon.history.series(uuid)) >= 2, 10,
                "two CPU points in the running guest's history")
    await until(lambda: (daemon.guest_extra(running).get("policy") or {}).get("managed") is True, 10,
                "policy state of the managed guest")
    assert daemon.listen_address is not None
    host, port = daemon.listen_address
    url = f"http://{host}:{port}/"

    dom = (await chromium(tmp_path, "--dump-dom", url)).decode()
    page = TableParser()
    page.feed(dom)
    assert page.title == "virtwatch"
    assert page.scripts == 0 and " src=" not in dom and "<link" not in dom
    header, *rows = page.rows
    assert header == ["Guest", "State", "CPU %", "CPU history", "Memory", "Memory history", "Last event", "Policy",
                      "Given up", "Links"]
    by_name = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    hrefs = {r[0]: h for r, h in zip(rows, page.hrefs[1:], strict=True)}
    sparks = {r[0]: s for r, s in zip(rows, page.sparks[1:], strict=True)}
    assert running in by_name and paused in by_name and odd in by_name, rows
    assert by_name[running]["State"] == by_name[odd]["State"] == "running (booted)"
    assert re.fullmatch(r"STARTED/BOOTED \d+ s ago", by_name[running]["Last event"]), by_name[running]
    assert by_name[running]["Policy"] == "dry-run, intent running"
    assert by_name[paused]["State"] == "paused (user)"
    assert re.fullmatch(r"SUSPENDED/PAUSED \d+ s ago", by_name[paused]["Last event"]), by_name[paused]
    assert by_name[paused]["Policy"] == "observed"
    # Sparklines: the running guest's CPU and memory (a line of at least two polls each).
    assert sparks[running] == {CPU_COLOR: 1, MEMORY_COLOR: 1}, sparks
    # Links: each guest's JSON (name percent-encoded); a captured console's text stays off the
    # HTTP port by default (http.serve_console): the page names the operator command instead.
    assert by_name[running]["Links"] == f"JSON · console: virtwatch console-log {running}"
    assert by_name[paused]["Links"] == by_name[odd]["Links"] == "JSON · no console"
    assert hrefs[odd][0] == "/api/v1/guests/vwland-odd%20%3F%23%25%26-" + odd.rsplit("-", 1)[1]
    async with aiohttp.ClientSession() as http:
        for name, links in hrefs.items():
            for href in links:
                async with http.get(f"http://{host}:{port}{href}") as r:
                    assert r.status == 200, (name, href, await r.text())
                    assert (await r.json())["name"] == name
    assert by_name[running]["Given up"] == by_name[paused]["Given up"] == ""
    # The test driver's bulk call has no cpu.* / balloon.* statistics; the per-domain fallback reads
    # them (virDomainGetInfo: 65536 KiB, and its cpuTime, which the test driver moves with the clock).
    assert by_name[running]["Memory"] == "64.0 MiB"
    assert float(by_name[running]["CPU %"]) > 0
    assert "<b>connected</b>" in dom and f"{len(rows)} guests" in dom

    shot = tmp_path / "landing.png"
    await chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", url)
    assert shot.exists()
    size = shot.stat().st_size
    assert 5_000 < size < 5_000_000, size
    width, height, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    white = bytes((255, 255, 255))
    ink = sum(1 for row in pixels for x in range(0, len(row), 3) if row[x:x + 3] != white)
    assert 0.01 < ink / (width * height) < 0.6, f"screenshot looks blank or broken: {ink} non-white pixels"
    # The table header's #eee background and the running state's green are drawn: the CSS applied.
    assert any(bytes((0xEE, 0xEE, 0xEE)) in row for row in pixels)
    assert any(bytes((0x1A, 0x7F, 0x37)) in row for row in pixels)
    # So are the sparklines: strokes 2 px wide and at least a few dozen pixels long, in their colours.
    for color in (CPU_COLOR, MEMORY_COLOR):
        drawn = sum(1 for row in pixels for x in range(0, len(row), 3) if near(row[x:x + 3], color))
        assert drawn >= 20, f"no {color} sparkline in the screenshot ({drawn} pixels)"
    keep = os.environ.get("VIRTWATCH_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "landing.png")
