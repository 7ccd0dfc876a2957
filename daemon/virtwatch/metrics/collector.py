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
        guests = self._guests.guests()
        snap = self._snapshot()
        yield from host_families(guests, snap.host if snap else None, self._info())
        yield from domain_families(guests, snap)

    def describe(self) -> list[Metric]:
        """No up-front description (families depend on the data)."""
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
        self.renders = 0

    def render(self) -> bytes:
        """The whole exposition; raises nothing libvirt-related (no calls)."""
        key = self._state.key()
        if key != self._cached_key:
            self._cached = generate_latest(self._state_registry)
            self._cached_key = key
            self.renders += 1
        return generate_latest(self._live) + self._cached
