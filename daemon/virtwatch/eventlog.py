"""Recent events in memory, for the HTTP API and operator commands."""

from __future__ import annotations

import collections
from collections.abc import Iterable

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

    def last_for(self, uuid: str) -> Event | None:
        """The newest event about the object with ``uuid``."""
        for e in reversed(self._events):
            if e.uuid == uuid:
                return e
        return None
