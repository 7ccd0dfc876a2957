"""The recent-events ring and the events API's pages (RecentEvents.page)."""

from __future__ import annotations

from virtwatch.eventlog import RecentEvents
from virtwatch.model import Event


def ev(seq: int, name: str = "web1") -> Event:
    return Event(time=1000.0 + seq, seq=seq, source="domain", kind="lifecycle", name=name, uuid=f"u-{name}",
                 event="STARTED", detail="BOOTED")


def filled(seqs: range, maxlen: int = 2000) -> RecentEvents:
    r = RecentEvents(maxlen)
    for s in seqs:
        r(ev(s, "db" if s % 3 == 0 else "web1"))
    return r


def test_a_cursor_reads_every_event_once_in_pages() -> None:
    r = filled(range(1, 11))
    seen: list[int] = []
    since, pages = 2, 0
    while True:
        page = r.page(since, 3)
        seen += [e["seq"] for e in page["events"]]
        since, pages = page["last_seq"], pages + 1
        assert page["gap"] is False
        if not page["more"]:
            break
    assert seen == list(range(3, 11)) and pages == 3  # 3 + 3 + 2
    assert r.page(10, 3) == {"events": [], "last_seq": 10, "more": False, "gap": False}


def test_without_a_cursor_the_newest_events() -> None:
    page = filled(range(1, 11)).page(0, 3)
    assert [e["seq"] for e in page["events"]] == [8, 9, 10]
    assert page["last_seq"] == 10 and page["more"] is False and page["gap"] is False


def test_one_guest() -> None:
    page = filled(range(1, 11)).page(1, 10, name="db")
    assert [e["seq"] for e in page["events"]] == [3, 6, 9] and page["last_seq"] == 9


def test_a_gap_is_said_when_the_ring_dropped_events_or_the_daemon_restarted() -> None:
    r = filled(range(1, 31), maxlen=10)  # holds 21..30
    page = r.page(5, 4)
    assert [e["seq"] for e in page["events"]] == [21, 22, 23, 24] and page["gap"] is True and page["more"] is True
    assert r.page(20, 4)["gap"] is False  # 21 follows 20: nothing lost
    restarted = r.page(500, 2)  # a cursor from before a restart: numbering began again
    assert restarted["gap"] is True and [e["seq"] for e in restarted["events"]] == [29, 30]
