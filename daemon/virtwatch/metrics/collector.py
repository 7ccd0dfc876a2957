"""The scrape path: render metrics from in-memory state, never calling libvirt.

Three kinds of collector make up ``/metrics``:

* the *live* registry: the daemon's own counters/gauges/histograms (events,
  API errors, poll duration, ...), process and platform metrics, rendered on
  every scrape;
* *component* collectors (guest agent, policy), added by name with
  :meth:`Exposition.add_collector` and rendered on every scrape;
* one :class:`StateCollector` over guest state and the latest poll. Its text
  only changes when guest state or the snapshot does, so it is rendered once
  per change and cached.

Each is rendered on its own, as node_exporter does: one that raises (in
``collect`` or while its families are formatted) is left out of that scrape,
never failing it, and ``virtwatch_collector_success{collector}`` is 0 for it.
The live registry counts as collector ``daemon``, the state collector as ``state``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ..state import GuestRegistry
from ..virt.migration import MigrationPhase, MigrationTracker
from ..virt.stats import Snapshot
from .domain import domain_families, host_families, stats_source_family
from .migration import migration_families

log = structlog.get_logger("virtwatch.metrics")

#: ``collector`` label of the live registry and of the state collector.
DAEMON, STATE = "daemon", "state"


class Collector(Protocol):
    """The prometheus-client custom collector protocol."""

    def collect(self) -> Iterator[Metric]:
        """Yield metric families."""

    def describe(self) -> list[Metric]:
        """Families known up front ([] when they depend on the data)."""


class StateCollector:
    """prometheus-client collector over guest state and the latest snapshot.

    Args:
        guests: the guest registry (read only).
        snapshot: returns the latest :class:`Snapshot` or None.
        info: returns the connection identity dict (versions, driver).
        migrations: migrations in progress and ended (None: no migration families).
    """

    def __init__(self, guests: GuestRegistry, snapshot: Callable[[], Snapshot | None],
                 info: Callable[[], Mapping[str, Any]], migrations: MigrationTracker | None = None) -> None:
        self._guests = guests
        self._snapshot = snapshot
        self._info = info
        self._migrations = migrations

    def key(self) -> tuple[Any, ...]:
        """Changes whenever the collected output would change."""
        snap = self._snapshot()
        return (self._guests.version, snap.seq if snap else -1, tuple(sorted(self._info().items())),
                self._migrations.version if self._migrations is not None else -1)

    def collect(self) -> Iterator[Metric]:
        """Yield host and per-guest families."""
        yield from self.frozen().collect()

    def frozen(self) -> FrozenState:
        """An immutable copy of what :meth:`collect` reads, safe to render in
        another thread while the loop keeps changing guest state."""
        m = self._migrations
        return FrozenState(self._guests.guests(), self._snapshot(), dict(self._info()),
                           m.phases() if m is not None else None, dict(m.counts) if m is not None else None)

    def describe(self) -> list[Metric]:
        """No up-front description (families depend on the data)."""
        return []


class FrozenState:
    """Guest list, snapshot, connection info and migrations (phases by UUID, counts) captured at one instant."""

    def __init__(self, guests: list[Any], snapshot: Snapshot | None, info: Mapping[str, Any],
                 phases: Mapping[str, MigrationPhase] | None = None,
                 counts: Mapping[tuple[str, str], int] | None = None) -> None:
        self._guests = guests
        self._snap = snapshot
        self._info = info
        self._phases = phases
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        """Yield host and per-guest families from the captured data."""
        yield from host_families(self._guests, self._snap.host if self._snap else None, self._info)
        phases = self._phases or {}
        yield from domain_families(self._guests, self._snap, {u: p.direction for u, p in phases.items()})
        if self._counts is not None:
            yield from migration_families(phases, self._counts)
        if self._snap is not None and self._snap.sources:
            yield stats_source_family(self._snap.sources)

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


class Exposition:
    """Renders the ``/metrics`` body in the Prometheus text format 0.0.4.

    Never raises because of a collector: see the module docstring.

    Args:
        live: registry of self-metrics, rendered every time (collector ``daemon``).
        state: the state collector, rendered once per change of :meth:`StateCollector.key`
            (collector ``state``; a failed render is cached like a good one: same key, same result).
        logger: structlog logger for ``collector_failed`` / ``collector_recovered``
            (once per change of a collector's success, not per scrape).
    """

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, live: CollectorRegistry, state: StateCollector, logger: Any = None) -> None:
        self._live = live
        self._state = state
        self._log = logger or log
        self._state_registry = CollectorRegistry(auto_describe=False)
        self._state_registry.register(state)
        self._components: dict[str, CollectorRegistry] = {}
        self._success: dict[str, bool] = {}
        self._cached_key: tuple[Any, ...] | None = None
        self._cached = b""
        self._cached_error: Exception | None = None
        self._pending: asyncio.Future[tuple[bytes, Exception | None]] | None = None
        self._pending_key: tuple[Any, ...] | None = None
        self.renders = 0

    def add_collector(self, name: str, collector: Collector) -> None:
        """Render ``collector`` on every scrape as ``virtwatch_collector_success{collector=name}``.

        Raises ValueError if ``name`` is taken (``daemon`` and ``state`` always are).
        """
        if name in (DAEMON, STATE) or name in self._components:
            raise ValueError(f"collector name {name!r} is already used")
        reg = CollectorRegistry(auto_describe=False)
        reg.register(collector)
        self._components[name] = reg

    def render(self) -> bytes:
        """The whole exposition, rendered on the calling thread (no libvirt calls)."""
        try:
            key = self._state.key()
        except Exception as err:  # reading the inputs failed: nothing to cache
            return self._assemble(b"", err)
        if key != self._cached_key:
            self._cached, self._cached_error = _render(self._state_registry)
            self._cached_key = key
            self.renders += 1
        return self._assemble(self._cached, self._cached_error)

    async def render_async(self) -> bytes:
        """Like :meth:`render`, but a cache miss renders a frozen copy of the
        state in a worker thread, so 1,000 guests (~270 ms of text) never
        stall the event loop. Concurrent misses share one render."""
        body, error = await self._state_body()
        return self._assemble(body, error)

    @property
    def cached_key(self) -> tuple[Any, ...] | None:
        """The :meth:`StateCollector.key` of the cached state text (None before the first render)."""
        return self._cached_key

    def current_key(self) -> tuple[Any, ...]:
        """The state collector's key now (raises what reading the inputs raises)."""
        return self._state.key()

    def prerender(self) -> asyncio.Future[tuple[bytes, Exception | None]] | None:
        """Start rendering the state text now, in a worker thread, unless it is cached or
        already rendering: called after each poll, so that a scrape finds a finished body
        instead of waiting for one. Returns the render (None if nothing was started)."""
        try:
            key = self._state.key()
        except Exception:  # the scrape will report it
            return None
        if key == self._cached_key or (self._pending is not None and self._pending_key == key):
            return None
        return asyncio.ensure_future(self._state_body())

    async def _state_body(self) -> tuple[bytes, Exception | None]:
        """The state text for the current key: cached, or rendered once in a worker thread."""
        try:
            key = self._state.key()
        except Exception as err:  # reading the inputs failed: nothing to cache
            return b"", err
        if key == self._cached_key:
            return self._cached, self._cached_error
        if self._pending is None or self._pending_key != key:
            try:
                frozen = self._state.frozen()
            except Exception as err:
                return b"", err
            reg = CollectorRegistry(auto_describe=False)
            reg.register(frozen)
            self._pending_key = key
            self._pending = asyncio.ensure_future(asyncio.to_thread(_render, reg))
        pending = self._pending
        body, error = await asyncio.shield(pending)  # a scrape that goes away must not cancel it
        if self._pending is pending:
            self._cached, self._cached_error, self._cached_key, self._pending = body, error, key, None
            self.renders += 1
        return body, error

    def _assemble(self, state_body: bytes, state_error: Exception | None) -> bytes:
        """Live and component texts (rendered now), the success family, then the state text."""
        parts: list[bytes] = []
        for name, source in ((DAEMON, self._live), *self._components.items()):
            body, error = _render(source)
            self._note(name, error)
            parts.append(body)
        self._note(STATE, state_error)
        success = GaugeMetricFamily("virtwatch_collector_success",
                                    "1 if the collector's last render succeeded; 0 if it raised and its "
                                    "families were left out of the scrape.", labels=["collector"])
        for name, ok in self._success.items():
            success.add_metric([name], 1 if ok else 0)
        parts.append(generate_latest(_Families([success])))
        parts.append(state_body)
        return b"".join(parts)

    def _note(self, name: str, error: Exception | None) -> None:
        """Record one collector's result; log only when it changes (a healthy first render is silent)."""
        ok = error is None
        if self._success.get(name, True) != ok:
            if error is None:
                self._log.info("collector_recovered", collector=name)
            else:
                self._log.error("collector_failed", collector=name, error=repr(error),
                                exc_info=(type(error), error, error.__traceback__),
                                detail="its families are left out of /metrics until it recovers")
        self._success[name] = ok


class _Families:
    """Already-built families as a collector, for :func:`generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        return iter(self._families)


def _render(source: CollectorRegistry) -> tuple[bytes, Exception | None]:
    """``(text, None)``, or ``(b"", the exception)`` when collecting or formatting raised.

    The whole text is built before it is returned, so a family that fails halfway
    is never half-written into the scrape. Safe to run in a worker thread.
    """
    try:
        return generate_latest(source), None
    except Exception as err:  # any bug in any collector: the scrape must still be answered
        return b"", err
