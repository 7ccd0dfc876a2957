"""Recent events in memory, for the HTTP API and operator commands."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

from .model import Event


class RecentEvents:
    """Ring buffer of the last ``maxlen`` events (a pump subscriber).

    Memory is bounded by ``maxlen`` whatever the event rate.
    """

    def __init__(self, maxlen: int = 2000) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=maxlen)

    def __call__(self, ev: Event) -> None:
        """Record ``ev`` (subscriber interface)."""
        self._events.append(ev)

    def since(self, seq: int = 0, name: str | None = None, limit: int = 500) -> list[Event]:
        """Events with ``seq`` greater than ``seq`` (oldest first), optionally
        for one object ``name``, at most ``limit`` of the newest."""
        out: Iterable[Event] = (e for e in self._events if e.seq > seq and (name is None or e.name == name))
        items = list(out)
        return items[-limit:] if limit > 0 else items

    def page(self, since: int, limit: int, name: str | None = None) -> dict[str, Any]:
        """One JSON-ready page of the events API (HTTP ``/api/v1/events``, control socket).

        ``since == 0``: the newest ``limit`` events (a tail). ``since > 0`` is a cursor: the
        oldest ``limit`` events after it, so that asking again with ``last_seq`` reads every
        event once. Keys: ``events`` (oldest first), ``last_seq`` (the cursor for the next
        page), ``more`` (events after ``last_seq`` are waiting), ``gap`` (events after
        ``since`` are no longer held: the ring dropped them, or ``since`` is from before a
        restart of the daemon, whose numbering starts again at 1).
        """
        matching = [e for e in self._events if name is None or e.name == name]
        newest = self._events[-1].seq if self._events else 0
        oldest = self._events[0].seq if self._events else 0
        restarted = since > newest
        if restarted:
            since = 0
        after = [e for e in matching if e.seq > since]
        if since == 0:
            got, more = after[-limit:], False
        else:
            got, more = after[:limit], len(after) > limit
        gap = restarted or (since > 0 and oldest > since + 1)
        return {"events": [e.as_dict() for e in got], "last_seq": got[-1].seq if got else since,
                "more": more, "gap": gap}

    def last_for(self, uuid: str) -> Event | None:
        """The newest event about the object with ``uuid``."""
        for e in reversed(self._events):
            if e.uuid == uuid:
                return e
        return None
