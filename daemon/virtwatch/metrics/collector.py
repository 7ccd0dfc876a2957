"""The scrape path: render metrics from in-memory state, never calling libvirt.

Two registries make up ``/metrics``:

* the *live* registry: the daemon's own counters/gauges/histograms (events,
  API errors, poll duration, ...) and any component collectors, rendered on
  every scrape;
* the *snapshot* registry: one :class:`StateCollector` over guest state and
  the latest poll. Its text only changes when guest state or the snapshot
  does, so it is rendered once per change and cached.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from ..state import GuestRegistry
from ..virt.stats import Snapshot
from .domain import domain_families, host_families


class StateCollector:
    """prometheus-client collector over guest state and the latest snapshot.

    Args:
        guests: the guest registry (read only).
        snapshot: returns the latest :class:`Snapshot` or None.
        info: returns the connection identity dict (versions, driver).
    """

    def __init__(self, guests: GuestRegistry, snapshot: Callable[[], Snapshot | None],
                 info: Callable[[], Mapping[str, Any]]) -> None:
        self._guests = guests
        self._snapshot = snapshot
        self._info = info

    def key(self) -> tuple[Any, ...]:
        """Changes whenever the collected output would change."""
        snap = self._snapshot()
        return (self._guests.version, snap.seq if snap else -1, tuple(sorted(self._info().items())))

    def collect(self) -> Iterator[Metric]:
        """Yield host and per-guest families."""
        yield from self.frozen().collect()

    def frozen(self) -> "FrozenState":
        """An immutable copy of what :meth:`collect` reads, safe to render in
        another thread while the loop keeps changing guest state."""
        return FrozenState(self._guests.guests(), self._snapshot(), dict(self._info()))

    def describe(self) -> list[Metric]:
        """No up-front description (families depend on the data)."""
        return []


class FrozenState:
    """Guest list, snapshot and connection info captured at one instant."""

    def __init__(self, guests: list[Any], snapshot: Snapshot | None, info: Mapping[str, Any]) -> None:
        self._guests = guests
        self._snap = snapshot
        self._info = info

    def collect(self) -> Iterator[Metric]:
        """Yield host and per-guest families from the captured data."""
        yield from host_families(self._guests, self._snap.host if self._snap else None, self._info)
        yield from domain_families(self._guests, self._snap)

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


class Exposition:
    """Renders the ``/metrics`` body in the Prometheus text format 0.0.4.

    Args:
        live: registry of self-metrics, rendered every time.
        state: the state collector, rendered once per change of :meth:`StateCollector.key`.
    """

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, live: CollectorRegistry, state: StateCollector) -> None:
        self._live = live
        self._state = state
        self._state_registry = CollectorRegistry(auto_describe=False)
        self._state_registry.register(state)
        self._cached_key: tuple[Any, ...] | None = None
        self._cached = b""
        self._pending: asyncio.Future[bytes] | None = None
        self._pending_key: tuple[Any, ...] | None = None
        self.renders = 0

    def render(self) -> bytes:
        """The whole exposition, rendered on the calling thread (no libvirt calls)."""
        key = self._state.key()
        if key != self._cached_key:
            self._cached = generate_latest(self._state_registry)
            self._cached_key = key
            self.renders += 1
        return generate_latest(self._live) + self._cached

    async def render_async(self) -> bytes:
        """Like :meth:`render`, but a cache miss renders a frozen copy of the
        state in a worker thread, so 1,000 guests (~270 ms of text) never
        stall the event loop. Concurrent misses share one render."""
        key = self._state.key()
        if key != self._cached_key:
            if self._pending is None or self._pending_key != key:
                frozen = self._state.frozen()
                reg = CollectorRegistry(auto_describe=False)
                reg.register(frozen)
                self._pending_key = key
                self._pending = asyncio.ensure_future(asyncio.to_thread(generate_latest, reg))
            pending = self._pending
            body = await asyncio.shield(pending)  # a scrape that goes away must not cancel it
            if self._pending is pending:
                self._cached, self._cached_key, self._pending = body, key, None
                self.renders += 1
            return generate_latest(self._live) + body
        return generate_latest(self._live) + self._cached
