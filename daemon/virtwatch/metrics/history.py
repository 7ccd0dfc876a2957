"""A small, bounded per-guest history of CPU and memory from consecutive snapshots,
for the status page's sparklines.

One :class:`Point` per guest per statistics poll, the last ``points`` (default 60)
kept per guest; a guest that leaves the snapshot (undefined, or a transient guest
that stopped) is forgotten at the next poll, so memory is bounded by
``guests × points`` points. Nothing here calls libvirt or reads a clock: times are
the snapshots' own (``collected_at``, wall seconds).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

from ..virt.stats import DomainStats, Snapshot

DEFAULT_POINTS = 60
KIB = 1024


def cpu_percent(prev: Snapshot | None, cur: Snapshot | None, uuid: str) -> float | None:
    """Guest CPU use in percent of one host CPU between two polls
    (``cpu.time`` delta over wall-time delta); None without two samples."""
    if prev is None or cur is None:
        return None
    a, b = prev.domains.get(uuid), cur.domains.get(uuid)
    if a is None or b is None or b.stale:
        return None
    t0, t1 = a.stats.get("cpu.time"), b.stats.get("cpu.time")
    dt = b.collected_at - a.collected_at
    if not isinstance(t0, int) or not isinstance(t1, int) or dt <= 0 or t1 < t0:
        return None
    return (t1 - t0) / 1e9 / dt * 100.0


def cpu_reference(snap: Snapshot) -> Snapshot:
    """``snap`` reduced to what :func:`cpu_percent` reads of it as the earlier poll: each
    guest's ``cpu.time`` (ns, the ``cpu`` stats group) and ``collected_at``, so that the poll
    before the latest does not keep every guest's whole statistics alive (about 5 MiB at
    1,000 guests). Stale guests and guests without ``cpu.time`` keep an empty dict."""
    domains = {}
    for uuid, ds in snap.domains.items():
        t = ds.stats.get("cpu.time")
        domains[uuid] = DomainStats(ds.name, uuid, {"cpu.time": t} if t is not None else {}, ds.stale,
                                    ds.collected_at)
    return dataclasses.replace(snap, domains=domains, host=None)


def memory_figure(stats: Mapping[str, Any]) -> tuple[int, str] | None:
    """(bytes, source) of the memory a guest costs its host: the QEMU process's resident
    memory (``balloon.rss``, source ``"rss"``) where the driver reports it, else the memory
    the balloon gives the guest (``balloon.current``, source ``"current"``); None without either.
    Both are host-side figures, kept while the guest's own balloon report is stale."""
    for key, source in (("balloon.rss", "rss"), ("balloon.current", "current")):
        v = stats.get(key)
        if isinstance(v, int) and v >= 0:
            return v * KIB, source
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    """One guest's figures from one poll.

    Attributes:
        time: wall seconds the figures were read (the poll's time for a stale guest).
        cpu_percent: :func:`cpu_percent` against the previous poll (100 = one host CPU);
            None when unknown (first poll, guest stale or not running).
        memory_bytes: :func:`memory_figure` in bytes; None when unknown or stale.
        memory_source: ``"rss"`` or ``"current"`` (see :func:`memory_figure`); "" with no figure.
    """

    time: float
    cpu_percent: float | None
    memory_bytes: int | None
    memory_source: str = ""


class GuestHistory:
    """The last ``points`` :class:`Point` of every guest in the latest snapshot, by UUID.

    Args:
        points: points kept per guest (≥ 2: a sparkline needs two).
    """

    def __init__(self, points: int = DEFAULT_POINTS) -> None:
        if points < 2:
            raise ValueError(f"points must be at least 2, not {points}")
        self.points = points
        self._by_uuid: dict[str, collections.deque[Point]] = {}

    def add(self, prev: Snapshot | None, cur: Snapshot) -> None:
        """Record ``cur`` (``prev`` is the poll before it, for CPU %). A stale guest gets an
        empty point (a gap: its figures are not new); guests not in ``cur`` are forgotten."""
        for uuid, ds in cur.domains.items():
            if ds.stale:
                point = Point(cur.time, None, None)
            else:
                mem = memory_figure(ds.stats)
                point = Point(ds.collected_at, cpu_percent(prev, cur, uuid),
                              mem[0] if mem else None, mem[1] if mem else "")
            q = self._by_uuid.get(uuid)
            if q is None:
                q = self._by_uuid[uuid] = collections.deque(maxlen=self.points)
            q.append(point)
        for uuid in [u for u in self._by_uuid if u not in cur.domains]:
            del self._by_uuid[uuid]

    def series(self, uuid: str) -> tuple[Point, ...]:
        """The guest's points, oldest first (empty for an unknown guest)."""
        return tuple(self._by_uuid.get(uuid, ()))

    def __len__(self) -> int:
        """Guests with a history."""
        return len(self._by_uuid)
