"""The status page's parts without a browser: the bounded per-guest history, the SVG sparklines
and the page itself, rendered with an injected wall time (the page in a real headless Chromium:
tests/integration/test_landing_browser.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from virtwatch.metrics.history import GuestHistory, Point, cpu_percent, cpu_reference, memory_figure
from virtwatch.metrics.landing import GuestRow, cpu_sparkline, guest_path, memory_sparkline, render_page, sparkline
from virtwatch.virt.stats import DomainStats, Snapshot

S = 1_000_000_000  # ns per second


def snap(seq: int, t: float, **guests: dict[str, Any] | None) -> Snapshot:
    """A poll at wall time ``t``: guest uuid → stats (None: the guest is stale, no new figures)."""
    return Snapshot(seq=seq, time=t, duration=0.01, host=None,
                    domains={u: DomainStats(u, u, st or {}, st is None, t) for u, st in guests.items()})


def test_history_points_cpu_and_memory_per_poll() -> None:
    h = GuestHistory(points=60)
    s1 = snap(1, 100.0, a={"cpu.time": 10 * S, "balloon.current": 65536, "balloon.rss": 20480})
    s2 = snap(2, 105.0, a={"cpu.time": 12 * S, "balloon.current": 65536, "balloon.rss": 30720})
    h.add(None, s1)
    h.add(s1, s2)
    assert h.series("a") == (Point(100.0, None, 20 * 2**20, "rss"), Point(105.0, 40.0, 30 * 2**20, "rss"))
    assert cpu_percent(s1, s2, "a") == pytest.approx(40.0)  # 2 s of CPU in 5 s
    assert h.series("unknown") == ()


def test_cpu_reference_keeps_only_what_cpu_percent_reads() -> None:
    s1 = snap(1, 100.0, a={"cpu.time": 10 * S, "balloon.rss": 20480, "block.0.rd.bytes": 7}, b=None,
              c={"state.state": 5})
    s2 = snap(2, 104.0, a={"cpu.time": 13 * S}, b={"cpu.time": 2 * S}, c={"state.state": 5})
    ref = cpu_reference(s1)
    assert {u: dict(d.stats) for u, d in ref.domains.items()} == {"a": {"cpu.time": 10 * S}, "b": {}, "c": {}}
    assert [(d.name, d.stale, d.collected_at) for d in ref.domains.values()] == [("a", False, 100.0),
                                                                               ("b", True, 100.0),
                                                                               ("c", False, 100.0)]
    assert (ref.seq, ref.time) == (1, 100.0)
    assert cpu_percent(ref, s2, "a") == cpu_percent(s1, s2, "a") == pytest.approx(75.0)  # 3 s of CPU in 4 s
    assert cpu_percent(ref, s2, "b") is None and cpu_percent(ref, s2, "c") is None


def test_history_is_bounded_and_forgets_guests_that_leave() -> None:
    h = GuestHistory(points=3)
    prev = None
    for i in range(10):
        guests: dict[str, dict[str, Any] | None] = {"a": {"cpu.time": i * S // 2}}
        if i < 7:  # b: fresh, then stale from poll 5, then undefined from poll 7
            guests["b"] = {"cpu.time": i * S} if i < 5 else None
        cur = snap(i, 100.0 + i, **guests)
        if i == 6:
            assert [p.cpu_percent for p in h.series("b")] == [pytest.approx(100.0), pytest.approx(100.0), None]
        h.add(prev, cur)
        prev = cur
    assert [p.time for p in h.series("a")] == [107.0, 108.0, 109.0]
    assert [p.cpu_percent for p in h.series("a")] == [pytest.approx(50.0)] * 3
    assert h.series("b") == () and len(h) == 1
    with pytest.raises(ValueError, match="at least 2"):
        GuestHistory(points=1)


def test_a_stale_guest_gets_a_gap_not_its_old_figures() -> None:
    h = GuestHistory()
    s1 = snap(1, 100.0, a={"cpu.time": S, "balloon.current": 1024})
    s2 = snap(2, 101.0, a=None)
    h.add(None, s1)
    h.add(s1, s2)
    assert h.series("a")[-1] == Point(101.0, None, None, "")


def test_memory_figure_prefers_rss_then_balloon_current() -> None:
    assert memory_figure({"balloon.rss": 2, "balloon.current": 4}) == (2048, "rss")
    assert memory_figure({"balloon.current": 4}) == (4096, "current")
    assert memory_figure({"balloon.usable": 4}) is None


def test_sparkline_geometry_newest_right_gaps_and_single_points() -> None:
    svg = sparkline([0.0, 50.0, 100.0], 3, 100.0, "cpu", "#0969da")
    assert '<polyline points="0.0,23 60.0,12 120.0,1" fill="none" stroke="#0969da" stroke-width="2"/>' in svg
    assert 'width="120" height="24"' in svg and "<title>cpu</title>" in svg
    # 4 of 5 steps: the newest at x=120, one step = 30 px; None splits the line; a lone value is a dot.
    svg = sparkline([10.0, None, 20.0, 20.0], 5, 20.0, "x", "#000")
    assert re.findall(r'points="([^"]*)"', svg) == ["90.0,1 120.0,1"]
    assert '<circle cx="30.0" cy="12" r="1.5" fill="#000"/>' in svg
    assert sparkline([None, None], 60, 1.0, "x", "#000") == ""
    # Above the scale is clipped to the top, below 0 to the bottom.
    assert 'points="60.0,1 120.0,23"' in sparkline([500.0, -3.0], 3, 100.0, "x", "#000")


def test_cpu_and_memory_sparklines_scale_and_say_what_they_show() -> None:
    pts = [Point(1.0, 20.0, 100 * 2**20, "rss"), Point(2.0, 250.0, 200 * 2**20, "rss")]
    cpu = cpu_sparkline(pts, 60)
    assert 'aria-label="CPU % over the last 2 polls: now 250.0, max 250.0, scale 0 to 250"' in cpu
    assert 'points="118.0,21 120.0,1"' in cpu  # 20 of 250 → y 21; one step of 59 = 2.03 px
    mem = memory_sparkline(pts, 60)
    assert "QEMU resident memory over the last 2 polls: now 200.0 MiB, min 100.0 MiB, max 200.0 MiB" in mem
    assert cpu_sparkline([Point(1.0, None, None)], 60) == memory_sparkline([Point(1.0, None, None)], 60) == ""


class Cells(HTMLParser):
    """Table cells as text, and every link's href."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.hrefs: list[str] = []
        self._cell: list[str] | None = None
        self._svg = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a":
            self.hrefs.append(dict(attrs)["href"] or "")
        elif tag == "svg":
            self._svg += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "svg":
            self._svg -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._svg:
            self._cell.append(data)


def guest(name: str, **over: Any) -> dict[str, Any]:
    g = {"name": name, "state": "running", "state_code": 1, "reason": "booted", "reason_code": 1,
         "last_event": {"event": "STARTED", "detail": "BOOTED", "time": 990.0},
         "memory_balloon_current_bytes": 64 * 2**20}
    g.update(over)
    return g


def test_page_rows_links_and_ages_with_an_injected_clock() -> None:
    odd = "web 1/<a>?#%"
    history = [Point(980.0 + i, 10.0 * i, 2**20 * (10 + i), "current") for i in range(5)]
    rows = [
        GuestRow(guest(odd), {"cpu_percent": 40.0, "console": {"status": "attached"},
                              "policy": {"managed": True, "mode": "enforce", "intent": "running",
                                         "pending_action": "restart"}}, history, 60, console_served=True),
        GuestRow(guest("db", state="paused", state_code=3, reason="user", reason_code=2, last_event=None,
                       memory_balloon_current_bytes=None),
                 {"cpu_percent": None, "console": None,
                  "policy": {"managed": True, "mode": "enforce", "intent": "running", "given_up": True,
                             "given_up_reason": "5 failures"}}, [], 60),
    ]
    page = render_page({"uri": "test:///default", "connected": True, "last_poll_time": 998.0}, rows, 1000.0, "1.2")
    p = Cells()
    p.feed(page)
    header, r1, r2 = p.rows
    assert header == ["Guest", "State", "CPU %", "CPU history", "Memory", "Memory history", "Last event", "Policy",
                      "Given up", "Links"]
    assert r1 == [odd, "running (booted)", "40.0", "", "64.0 MiB", "", "STARTED/BOOTED 10 s ago",
                  "enforce, intent running, restart pending", "", "JSON · console"]
    assert r2 == ["db", "paused (user)", "", "", "", "", "", "enforce, intent running", "yes", "JSON · no console"]
    quoted = "/api/v1/guests/web%201%2F%3Ca%3E%3F%23%25"
    assert guest_path(odd) == quoted
    assert [h for h in p.hrefs if h.startswith("/api/v1/guests/")] == [quoted, quoted, quoted + "/console",
                                                                        "/api/v1/guests/db", "/api/v1/guests/db"]
    assert page.count('<svg class="spark"') == 2  # the guest with a history: CPU and memory
    assert "last poll 2 s ago" in page and "<script" not in page and "&lt;a&gt;" in page
    assert 'title="5 failures"' in page and 'title="state 3, reason 2"' in page


def test_a_captured_console_not_served_over_http_names_the_operator_command() -> None:
    row = GuestRow(guest("web 1"), {"cpu_percent": None, "console": {"status": "attached"}, "policy": None}, [], 60)
    p = Cells()
    p.feed(render_page({"uri": "test:///default", "connected": True}, [row], 1000.0, "1.2"))
    assert p.rows[1][-1] == "JSON · console: virtwatch console-log 'web 1'"
    assert [h for h in p.hrefs if h.startswith("/api/v1/guests/")] == ["/api/v1/guests/web%201"] * 2
