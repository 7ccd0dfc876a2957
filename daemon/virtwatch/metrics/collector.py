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

The state text comes first in the body, then the per-scrape text. The state text
is rendered under the series budget, with guest label values capped
(:mod:`~virtwatch.metrics.bounds`), and deflated once per render for gzip scrapes
(:mod:`~virtwatch.metrics.gzipbody`). Per scrape: ``virtwatch_exposed_series``
(every series of the body but these bounds families themselves),
``virtwatch_exposed_family_series{family}``, ``virtwatch_series_budget``,
``virtwatch_series_budget_tiers_dropped`` and ``virtwatch_series_dropped_total{family}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..state import GuestRegistry
from ..virt.migration import MigrationPhase, MigrationTracker
from ..virt.stats import Snapshot
from .bounds import TIERS, BudgetPlan, cap_labels, count_series, exposed_name, plan_budget
from .domain import domain_families, host_families, stats_source_family
from .guesttext import GuestText
from .gzipbody import EMPTY, DeflatedPart, deflate_part, gzip_body
from .migration import migration_families
from .text import FamilyTexts, write_text

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
        """Yield host and per-guest families from the captured data (as metric objects: the
        reference :meth:`render` is tested against)."""
        yield from self.host_families()
        yield from domain_families(self._guests, self._snap, self._migrating())
        yield from self.tail_families()

    def host_families(self) -> list[Metric]:
        """The families before the per-guest ones: host identity, guests by state, host figures."""
        return host_families(self._guests, self._snap.host if self._snap else None, self._info)

    def guest_lines(self, writer: GuestText) -> list[list[str]]:
        """The per-guest families' sample lines (:meth:`GuestText.render`)."""
        return writer.render(self._guests, self._snap, self._migrating())

    def tail_families(self) -> list[Metric]:
        """The families after the per-guest ones: migrations and the statistics' sources."""
        out: list[Metric] = []
        if self._counts is not None:
            out.extend(migration_families(self._phases or {}, self._counts))
        if self._snap is not None and self._snap.sources:
            out.append(stats_source_family(self._snap.sources))
        return out

    def _migrating(self) -> dict[str, str]:
        return {u: p.direction for u, p in (self._phases or {}).items()}

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


@dataclasses.dataclass(frozen=True, slots=True)
class StateText:
    """One render of the state collector.

    Attributes:
        body: the text (b"" if the render raised).
        error: what the render raised, or None.
        deflated: ``body`` deflated for gzip scrapes.
        counts: series per family exposed (left-out families not included).
        plan: the series budget's decision.
    """

    body: bytes = b""
    error: Exception | None = None
    deflated: DeflatedPart = EMPTY
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    plan: BudgetPlan = dataclasses.field(default_factory=BudgetPlan)


class Exposition:
    """Renders the ``/metrics`` body in the Prometheus text format 0.0.4.

    Never raises because of a collector: see the module docstring.

    Args:
        live: registry of self-metrics, rendered every time (collector ``daemon``).
        state: the state collector, rendered once per change of :meth:`StateCollector.key`
            (collector ``state``; a failed render is cached like a good one: same key, same result).
        logger: structlog logger for ``collector_failed`` / ``collector_recovered``
            (once per change of a collector's success, not per scrape) and for
            ``series_budget_exceeded`` / ``series_budget_met`` (once per change of the tiers left out).
        max_series: the series budget (``metrics.max_series``; 0: none). The state text is
            planned against the other collectors' series of the latest scrape.
    """

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, live: CollectorRegistry, state: StateCollector, logger: Any = None,
                 max_series: int = 0) -> None:
        self._live = live
        self._state = state
        self._log = logger or log
        self._max_series = max_series
        self._components: dict[str, CollectorRegistry] = {}
        self._success: dict[str, bool] = {}
        self._cached_key: tuple[Any, ...] | None = None
        self._cached = StateText()
        self._pending: asyncio.Future[StateText] | None = None
        self._pending_key: tuple[Any, ...] | None = None
        self._again = False
        self._bounds_text: tuple[StateText, dict[str, int], bytes] | None = None
        self._other_series = 0
        self._dropped_total: dict[str, int] = {}
        self._budget_state: tuple[tuple[str, ...], bool] = ((), True)
        self._guest_text = GuestText()
        # the daemon's own families at each scrape: most are as the last scrape wrote them;
        # and the host and tail families at each render: most are as the last render wrote them
        self._own_texts: dict[str, FamilyTexts] = {}
        self._state_texts = (FamilyTexts(), FamilyTexts())  # before and after the guests' families
        self.renders = 0
        # whether the last render_async answered a render older than the state (set before it returns)
        self.answered_behind = False

    def add_collector(self, name: str, collector: Collector) -> None:
        """Render ``collector`` on every scrape as ``virtwatch_collector_success{collector=name}``.

        Raises ValueError if ``name`` is taken (``daemon`` and ``state`` always are).
        """
        if name in (DAEMON, STATE) or name in self._components:
            raise ValueError(f"collector name {name!r} is already used")
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Capped(collector))
        self._components[name] = reg

    def render(self, gzip: bool = False) -> bytes:
        """The whole exposition, rendered on the calling thread (no libvirt calls);
        ``gzip``: as one gzip member."""
        try:
            key = self._state.key()
        except Exception as err:  # reading the inputs failed: nothing to cache
            return self._assemble(StateText(error=err), gzip)
        if key != self._cached_key:
            try:
                frozen = self._state.frozen()
            except Exception as err:
                return self._assemble(StateText(error=err), gzip)
            self._adopt(key, _render_state(frozen, self._guest_text, self._state_texts, self._max_series,
                                             self._others()))
        return self._assemble(self._cached, gzip)

    async def render_async(self, gzip: bool = False, wait: bool = False) -> bytes:
        """Like :meth:`render`, but the state text is rendered from a frozen copy of the
        state in a worker thread, so 1,000 guests (~45 ms of text) never stall the event loop.

        A scrape never waits for a render (``wait=False``, ``/metrics``): when the state changed
        since the cached text, it answers the cached text, one render behind, and starts the
        render the next scrape will find (:meth:`prerender`, after each poll and each guest
        event, has usually started it already). Only the first scrape, with nothing cached,
        waits. ``wait=True`` waits for the text of the state now (concurrent waits share one
        render)."""
        self.answered_behind = False
        if not wait and self._cached_key is not None:
            try:
                key = self._state.key()
            except Exception as err:  # reading the inputs failed: say so, as render() does
                return self._assemble(StateText(error=err), gzip)
            if key != self._cached_key:
                self.answered_behind = True
                self.prerender()
            return self._assemble(self._cached, gzip)
        return self._assemble(await self._state_body(), gzip)

    @property
    def cached_key(self) -> tuple[Any, ...] | None:
        """The :meth:`StateCollector.key` of the cached state text (None before the first render)."""
        return self._cached_key

    @property
    def rendering(self) -> asyncio.Future[StateText] | None:
        """The render running in a worker thread now (None when none is)."""
        return self._pending

    def current_key(self) -> tuple[Any, ...]:
        """The state collector's key now (raises what reading the inputs raises)."""
        return self._state.key()

    def prerender(self) -> asyncio.Future[StateText] | None:
        """Start rendering the state text now, in a worker thread, unless it is cached or
        already rendering: called after each poll and each guest event, so that a scrape
        finds a finished body. One render at a time: a change while one runs starts the next
        when it ends (an event storm costs a render per render time, not one per event).
        Returns the render (None if nothing was started)."""
        try:
            key = self._state.key()
        except Exception:  # the scrape will report it
            return None
        if key == self._cached_key:
            return None
        if self._pending is not None:
            self._again = self._again or self._pending_key != key
            return None
        try:
            return self._start(key)
        except Exception:  # freezing the state failed: the scrape will report it
            return None

    def on_event(self, _event: object) -> None:
        """Pump subscriber (after the guest table's): render the changed guest state now."""
        self.prerender()

    def _start(self, key: tuple[Any, ...]) -> asyncio.Future[StateText]:
        """Render the state of ``key`` in a worker thread; its result is adopted by a done
        callback (:meth:`_rendered`), not by a task: one loop pass when the thread ends, where
        a task awaiting it took four. Raises what freezing the state raises."""
        frozen = self._state.frozen()
        self._pending_key = key
        self._pending = asyncio.get_running_loop().run_in_executor(
            None, _render_state, frozen, self._guest_text, self._state_texts, self._max_series, self._others())
        self._pending.add_done_callback(functools.partial(self._rendered, key))
        return self._pending

    def _rendered(self, key: tuple[Any, ...], render: asyncio.Future[StateText]) -> None:
        """Adopt a finished render unless a newer one replaced it; start the next when the
        state changed meanwhile."""
        if self._pending is not render:
            return
        self._pending = None
        if render.cancelled():  # the executor shut down: nothing to adopt
            return
        self._adopt(key, render.result())
        if self._again:  # the state changed while this one rendered
            self._again = False
            self.prerender()

    async def _state_body(self) -> StateText:
        """The state text for the current key: cached, or rendered once in a worker thread
        (concurrent callers share one render)."""
        try:
            key = self._state.key()
        except Exception as err:  # reading the inputs failed: nothing to cache
            return StateText(error=err)
        if key == self._cached_key:
            return self._cached
        pending = self._pending
        if pending is None or self._pending_key != key:
            try:
                pending = self._start(key)
            except Exception as err:
                return StateText(error=err)
        return await asyncio.shield(pending)  # a scrape that goes away must not cancel it

    def _others(self) -> int:
        """Series of the live and component collectors (and the success family) now, for the
        budget's plan: counted on their text, rendered again only when there is a budget
        (a poll's render must not wait for a scrape to learn them)."""
        if self._max_series > 0:
            texts = [_render(source)[0] for source in (self._live, *self._components.values())]
            self._other_series = sum(count_series(b"".join(texts)).values()) + len(self._success)
        return self._other_series

    def _adopt(self, key: tuple[Any, ...], text: StateText) -> None:
        """Cache a new state render; count what its budget left out and log a change of tiers."""
        self._cached, self._cached_key = text, key
        self.renders += 1
        plan = text.plan
        for family, n in plan.dropped.items():
            self._dropped_total[family] = self._dropped_total.get(family, 0) + n
        if text.error is not None or (plan.tiers, plan.met) == self._budget_state:
            return
        self._budget_state = (plan.tiers, plan.met)
        if plan.tiers or not plan.met:
            self._log.warning("series_budget_exceeded", max_series=self._max_series, exposed=plan.exposed,
                              tiers_dropped=list(plan.tiers), dropped_series=sum(plan.dropped.values()), met=plan.met,
                              detail="families left out of /metrics: virtwatch_series_dropped_total says which")
        else:
            self._log.info("series_budget_met", max_series=self._max_series, exposed=plan.exposed)

    def _assemble(self, state: StateText, gzip: bool) -> bytes:
        """The state text, then live and component texts (rendered now), the success family
        and the bounds families; plain, or one gzip member over the cached deflated state."""
        parts: list[bytes] = []
        for name, source in ((DAEMON, self._live), *self._components.items()):
            body, error = _render(source, self._own_texts.setdefault(name, FamilyTexts()))
            self._note(name, error)
            parts.append(body)
        self._note(STATE, state.error)
        success = GaugeMetricFamily("virtwatch_collector_success",
                                    "1 if the collector's last render succeeded; 0 if it raised and its "
                                    "families were left out of the scrape.", labels=["collector"])
        for name, ok in self._success.items():
            success.add_metric([name], 1 if ok else 0)
        parts.append(write_text([success]))
        own = b"".join(parts)
        own_counts = count_series(own)
        self._other_series = sum(own_counts.values())
        cached = self._bounds_text
        if cached is None or cached[0] is not state or cached[1] != own_counts:
            # they change with a render or a new series of the daemon's own, not per scrape
            cached = self._bounds_text = (state, own_counts, write_text(self._bounds_families(state, own_counts)))
        tail = own + cached[2]
        return gzip_body(state.deflated, tail) if gzip else state.body + tail

    def _bounds_families(self, state: StateText, own: Mapping[str, int]) -> list[Metric]:
        """Series counts and the budget's state (see the module docstring)."""
        counts = {**state.counts}
        for family, n in own.items():
            counts[family] = counts.get(family, 0) + n
        per_family = GaugeMetricFamily("virtwatch_exposed_family_series",
                                       "Series of each family in this exposition.", labels=["family"])
        for family, n in sorted(counts.items()):
            if n:
                per_family.add_metric([family], n)
        dropped = CounterMetricFamily("virtwatch_series_dropped",
                                      "Series the series budget (metrics.max_series) left out, summed over "
                                      "renders (one per poll).", labels=["family"])
        for family, n in sorted(self._dropped_total.items()):
            dropped.add_metric([family], n)
        return [
            GaugeMetricFamily("virtwatch_exposed_series", "Series in this exposition (the bounds families "
                              "virtwatch_exposed_* and virtwatch_series_* not counted).", value=sum(counts.values())),
            per_family,
            GaugeMetricFamily("virtwatch_series_budget", "The series budget, metrics.max_series (0: none).",
                              value=self._max_series),
            GaugeMetricFamily("virtwatch_series_budget_tiers_dropped",
                              "Tiers of guest families the series budget leaves out now (0 to 3: vcpu, "
                              "device_detail, device).", value=len(state.plan.tiers)),
            dropped,
        ]

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


class _Capped:
    """A component collector whose label values are capped (:func:`~virtwatch.metrics.bounds.cap_labels`)."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        """The collector's families, capped."""
        return cap_labels(self._collector.collect())

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


def _render(source: CollectorRegistry, texts: FamilyTexts | None = None) -> tuple[bytes, Exception | None]:
    """``(text, None)``, or ``(b"", the exception)`` when collecting or formatting raised.

    The text is prometheus-client's (:func:`~virtwatch.metrics.text.write_text` writes
    the bytes ``generate_latest`` would, in less time: this runs at every scrape; given
    ``texts``, the families unchanged since its last call are not formatted again). The
    whole text is built before it is returned, so a family that fails halfway is never
    half-written into the scrape. Safe to run in a worker thread.
    """
    try:
        return (texts.write(source.collect()) if texts is not None else write_text(source.collect())), None
    except Exception as err:  # any bug in any collector: the scrape must still be answered
        return b"", err


def _render_state(frozen: FrozenState, guest_text: GuestText, family_texts: tuple[FamilyTexts, FamilyTexts],
                  max_series: int, other: int) -> StateText:
    """Collect, cap label values, plan the budget against ``other`` series, render and deflate.

    The host and tail families go through ``family_texts`` (one for each: prometheus-client's
    text, faster, and not formatted again when a family is as the last render wrote it), the
    per-guest ones through ``guest_text`` (the same text again, without metric objects). A
    failure anywhere gives ``StateText(error=…)``, never a half-written text. Safe in a worker thread.
    """
    try:
        head = list(cap_labels(frozen.host_families()))
        lines = frozen.guest_lines(guest_text)
        tail = list(cap_labels(frozen.tail_families()))
        counts: dict[str, int] = {}
        for family in (*head, *tail):
            name = exposed_name(family)
            counts[name] = counts.get(name, 0) + len(family.samples)
        for name, family_lines in zip(guest_text.family_names, lines, strict=True):
            counts[name] = counts.get(name, 0) + len(family_lines)
        plan = plan_budget(counts, max_series, other)
        left_out = {f for tier, tier_families in TIERS if tier in plan.tiers for f in tier_families}
        body = b"".join((family_texts[0].write(f for f in head if exposed_name(f) not in left_out),
                         guest_text.text(lines, left_out).encode("utf-8"),
                         family_texts[1].write(f for f in tail if exposed_name(f) not in left_out)))
        kept = {name: n for name, n in counts.items() if name not in left_out}
        return StateText(body, None, deflate_part(body), kept, plan)
    except Exception as err:  # any bug in any collector: the scrape must still be answered
        return StateText(error=err)
