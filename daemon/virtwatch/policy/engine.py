"""The policy engine: events in, decisions out, actions carried out with guards.

- :meth:`PolicyEngine.on_event` only enqueues (safe to call from the event pump).
- One worker task per guest: it coalesces a burst of events (``debounce``),
  classifies them in order with the guest's context (preceding SHUTDOWN
  detail, watchdog action, our own in-flight operation), calls the pure
  :func:`~virtwatch.policy.decide.decide`, persists every transition
  (:class:`~virtwatch.store.Store`, one transaction each) and runs the
  scheduled action when it is due.
- Guards: nothing is decided while :meth:`set_ready` is False; a circuit
  breaker defers actions beyond ``max_actions_per_minute``; starts and
  restores are bounded by semaphores; every libvirt call has a deadline.
- Own operations are tagged: events arriving while one runs (and
  ``own_event_grace`` seconds after) are classified as ours.
- Modes: ``enforce`` acts; ``dry-run`` logs "would ..." and journals the
  decision; ``observe`` only tracks state.

Also: the boot flow (:meth:`run_boot_flow`), the host-shutdown save path
(:meth:`save_guests`), and operator commands (:meth:`hold`, :meth:`release`,
:meth:`reset`, :meth:`set_override`, :meth:`explain`, :meth:`snapshot`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import structlog

from ..store import GuestState, Store
from ..virt.records import Event
from . import budget
from .classify import STOPPING_OPS, Classification, ClassifyInput, Transition, classify, classify_state
from .clock import Clock, SystemClock
from .config import PolicySettings, ShutdownStep
from .decide import Action, Decision, GuestRecord, decide, decide_recover, initial_intent
from .host import BOOT_ID_PATH, LibvirtGuestsPaths, libvirt_guests_active, read_boot_id
from .ports import ACTIVE_STATES, DomainState, ErrorCode, Hypervisor, HypervisorError, RunningReason
from .select import Selection, select, validate_override

T = TypeVar("T")

#: Window of the ``max_actions_per_minute`` circuit breaker, seconds.
BREAKER_WINDOW = 60.0
#: Poll interval while waiting for a guest to power off / libvirt to settle, seconds.
POLL_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyAlert:
    """An alert the engine raises (given up, I/O error pause, restore failure, breaker...).

    ``kind`` is a stable identifier: ``given_up``, ``io_error``, ``api_error``, ``crash_left``,
    ``watchdog``, ``restore_failed``, ``image_not_used``, ``start_failed``, ``breaker_open``.
    ``time`` is wall-clock seconds.
    """

    kind: str
    guest: str
    uuid: str
    message: str
    time: float


@dataclasses.dataclass(frozen=True, slots=True)
class GuestSnapshot:
    """Per-guest policy state for metrics and ``virtwatch status``.

    ``next_retry`` is wall-clock seconds or None; ``restarts`` counts restarts
    performed by cause (the ``reason`` label of ``libvirt_domain_restarts_total``);
    ``override`` is the runtime policy override in force (JSON values, {} if none).
    """

    name: str
    uuid: str
    intent: str
    managed: bool
    mode: str
    given_up: bool
    given_up_reason: str
    next_retry: float | None
    pending_action: str | None
    attempt: int
    failures_in_window: int
    restarts: Mapping[str, int]
    state: int | None
    reason: int | None
    override: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclasses.dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Engine-wide state: readiness, breaker, action counters ``(action, result) -> n``, guests by name."""

    ready: bool
    host_shutdown: bool
    breaker_open: bool
    actions: Mapping[tuple[str, str], int]
    guests: Mapping[str, GuestSnapshot]


@dataclasses.dataclass(frozen=True, slots=True)
class Explanation:
    """``virtwatch explain GUEST``: merged policy, where each key came from, and what would happen now."""

    name: str
    uuid: str
    managed: bool
    mode: str
    mode_source: str
    intent: str
    state: int | None
    reason: int | None
    policy: Mapping[str, Any]
    sources: Mapping[str, str]
    matched_rules: tuple[int, ...]
    errors: tuple[str, ...]
    history: budget.History
    pending_action: str | None
    decision_now: str

    def lines(self) -> list[str]:
        """Human-readable rendering, one line per item."""
        out = [f"guest {self.name} ({self.uuid})", f"managed: {'yes' if self.managed else 'no (observed only)'}",
               f"mode: {self.mode} (from {self.mode_source})", f"intent: {self.intent}",
               f"state: {self.state}/{self.reason}"]
        h = self.history
        out.append(f"attempt: {h.attempt}, failures in window: {len(h.failures)}, given up: {h.given_up}"
                   + (f" ({h.given_up_reason})" if h.given_up else ""))
        if self.pending_action:
            out.append(f"pending: {self.pending_action} at {h.next_retry}")
        for k, v in self.policy.items():
            out.append(f"  {k} = {v!r}  [{self.sources.get(k, 'defaults')}]")
        out.extend(f"warning: {e}" for e in self.errors)
        out.append(f"now: {self.decision_now}")
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class BootReport:
    """Outcome of :meth:`PolicyEngine.run_boot_flow`: ``skipped`` when this boot id was already handled."""

    boot_id: str
    skipped: bool
    started: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    would_start: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class SaveReport:
    """Outcome of :meth:`PolicyEngine.save_guests`: per guest the step that worked (or ``failed``)."""

    refused: bool
    why: str
    results: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


def _guest_failure(ev: Event) -> bool:
    """Events that only the guest (or QEMU) causes, never a virtwatch operation."""
    if ev.kind in ("io_error", "watchdog"):
        return True
    if ev.kind != "lifecycle":
        return False
    return (ev.event == "CRASHED" or (ev.event == "STOPPED" and ev.detail in ("CRASHED", "FAILED"))
            or (ev.event == "SUSPENDED" and ev.detail in ("IOERROR", "WATCHDOG")))


#: seconds to wait, after a CRASHED event, for libvirt's STOPPED/CRASHED before deciding on the crash itself
CRASH_STOP_WAIT = 10.0


@dataclasses.dataclass(slots=True)
class _Item:
    kind: str                 # "event", "resync", "recover", "wake", "crash_timeout"
    event: Event | None
    arrived: float            # monotonic
    state: tuple[int, int] | None = None
    why: str = ""


@dataclasses.dataclass(slots=True)
class _OpTag:
    op: str
    started: float
    ended: float | None = None


@dataclasses.dataclass(slots=True)
class _Guest:
    st: GuestState
    queue: asyncio.Queue[_Item]
    worker: asyncio.Task[None] | None = None
    live: tuple[int, int] | None = None
    metadata: str | None = None
    metadata_known: bool = False
    prev_shutdown: str | None = None
    watchdog_action: str | None = None
    ops: list[_OpTag] = dataclasses.field(default_factory=list)
    pending_due: float | None = None     # monotonic
    gone: bool = False
    last_cause: str | None = None
    crash_deferred: Event | None = None   # a CRASHED event waiting for libvirt's STOPPED/CRASHED
    stop_seen: str | None = None          # boot id when a live STOPPED/CRASHED event last arrived


class PolicyEngine:
    """Keeps guests running by policy.

    Args:
        settings: the ``[policy]`` section (replace with :meth:`update_settings` on reload).
        hypervisor: the :class:`~virtwatch.policy.ports.Hypervisor` port.
        store: opened :class:`~virtwatch.store.Store`.
        clock: time source (``SystemClock()``).
        rand: random source in [0, 1) for jitter.
        alert: called with each :class:`PolicyAlert` (must not block).
        boot_id_path: file holding the host boot id.
        libvirt_guests: where to detect libvirt-guests.
        auto_boot_flow: run :meth:`run_boot_flow` by itself when first ready on a new boot
            (before reconciling); until the boot flow has run, stops seen at resync are
            treated as the host's shutdown, never as failures.
        logger: a structlog logger.

    Attributes:
        selection_listeners: called with a guest name when its merged policy may
            have changed (domain metadata read or changed, runtime override set);
            the console capture re-checks ``capture_console`` there.
    """

    def __init__(self, settings: PolicySettings, hypervisor: Hypervisor, store: Store, *,
                 clock: Clock | None = None, rand: Callable[[], float] | None = None,
                 alert: Callable[[PolicyAlert], None] | None = None,
                 boot_id_path: str | Path = BOOT_ID_PATH,
                 libvirt_guests: LibvirtGuestsPaths = LibvirtGuestsPaths(),
                 auto_boot_flow: bool = True,
                 logger: Any = None) -> None:
        self._settings = settings
        self._hv = hypervisor
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._rand = rand or random.Random().random
        self._alert_sink = alert
        self._boot_id_path = boot_id_path
        self._lg_paths = libvirt_guests
        self._log = logger or structlog.get_logger("virtwatch.policy")
        self._guests: dict[str, _Guest] = {}
        self._ready = asyncio.Event()
        self._host_shutdown = False
        self._running = False
        self._action_times: collections.deque[float] = collections.deque()
        self._breaker_open = False
        self._actions: collections.Counter[tuple[str, str]] = collections.Counter()
        self._recover: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = 0
        self._starts = asyncio.Semaphore(settings.max_parallel_starts)
        self._restores = asyncio.Semaphore(settings.max_parallel_restores)
        self.alerts: collections.deque[PolicyAlert] = collections.deque(maxlen=1000)
        self._auto_boot = auto_boot_flow
        self._boot_lock = asyncio.Lock()
        self._boot_id: str | None = None
        self.selection_listeners: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load persisted state, close interrupted actions, start workers for guests with a pending retry."""
        if self._running:
            return
        self._running = True
        try:
            self._boot_id = read_boot_id(self._boot_id_path)
        except OSError as err:
            self._boot_id = None
            self._log.warning("policy_boot_id_unreadable", path=str(self._boot_id_path), error=str(err))
        for name, st in self._store.load_guests().items():
            g = self._guest(name, st.uuid, st)
            if st.pending_action and st.history.next_retry is not None:
                delay = max(0.0, st.history.next_retry - self._clock.time())
                g.pending_due = self._clock.monotonic() + delay
                self._log.info("policy_pending_reloaded", guest=name, uuid=st.uuid, action=st.pending_action,
                               in_seconds=round(delay, 3))
                self._wake(g)
        for row in self._store.interrupted_actions():
            self._store.finish_action(row.id, "interrupted", "daemon stopped while the action ran")
            self._actions[(row.action, "interrupted")] += 1
            self._recover.add(row.guest)
            self._log.warning("policy_action_interrupted", guest=row.guest, action=row.action, action_id=row.id,
                              msg="checking the guest's real state at the next resync instead of repeating it")

    async def stop(self) -> None:
        """Cancel workers and background tasks (pending retries stay persisted)."""
        self._running = False
        tasks = [g.worker for g in self._guests.values() if g.worker] + list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for g in self._guests.values():
            g.worker = None

    def update_settings(self, settings: PolicySettings) -> None:
        """Apply a reloaded ``[policy]`` section: selections are recomputed and every guest reconciled."""
        self._settings = settings
        self._starts = asyncio.Semaphore(settings.max_parallel_starts)
        self._restores = asyncio.Semaphore(settings.max_parallel_restores)
        if self._running and self.ready:
            self._spawn(self.resync())

    def set_ready(self, ready: bool) -> None:
        """The connection is up and state resynced (True) or not (False). On True, reconcile every guest."""
        was = self._ready.is_set()
        if ready and not was:
            self._ready.set()
            self._spawn(self._on_ready())
        elif not ready and was:
            self._ready.clear()
        self._log.info("policy_ready", ready=ready)

    async def _on_ready(self) -> None:
        if self._auto_boot and self.boot_flow_pending():
            try:
                await self.run_boot_flow()
            except (HypervisorError, OSError) as err:
                self._log.warning("policy_boot_flow_failed", error=str(err))
        await self.resync()

    def boot_flow_pending(self) -> bool:
        """True while the boot flow of the current host boot has not completed."""
        if self._boot_id is None:
            return False
        if self._store.get_meta("boot_id") != self._boot_id:
            return True
        return any(g.st.boot_pending == self._boot_id for g in self._guests.values())

    def set_host_shutdown(self, active: bool) -> None:
        """The host is (or is no longer) shutting down: stops then are never reacted to."""
        self._host_shutdown = active

    @property
    def ready(self) -> bool:
        """Whether decisions may be taken."""
        return self._ready.is_set()

    # ------------------------------------------------------------------ intake

    def on_event(self, event: Event) -> None:
        """Enqueue one domain event (non-domain events are ignored). Never blocks, never raises."""
        if event.source != "domain" or not event.name:
            return
        g = self._guest(event.name, event.uuid)
        if event.kind == "lifecycle" and event.event in ("STOPPED", "CRASHED"):
            g.stop_seen = self._boot_id  # stopped under our eyes in this boot: its own event decides, not the boot flow
        g.queue.put_nowait(_Item("event", event, self._clock.monotonic()))
        self._ensure_worker(g)

    async def resync(self) -> None:
        """Reconcile with libvirt's current guest list (after every (re)connect). Errors are logged."""
        try:
            infos = await self._call("list_guests", self._hv.list_guests())
        except HypervisorError as err:
            self._log.warning("policy_resync_failed", code=err.code, error=err.message)
            return
        seen = set()
        for info in infos:
            seen.add(info.name)
            g = self._guest(info.name, info.uuid)
            g.gone = False
            g.metadata_known = False
            g.queue.put_nowait(_Item("resync", None, self._clock.monotonic(), (info.state, info.reason)))
            self._ensure_worker(g)
        for name, g in self._guests.items():
            if name not in seen and not g.gone:
                g.gone = True

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _guest(self, name: str, uuid: str = "", st: GuestState | None = None) -> _Guest:
        g = self._guests.get(name)
        if g is None:
            if st is None:
                st = self._store.get_guest(name)
            st = st or GuestState(name=name, uuid=uuid, intent="unknown")
            g = _Guest(st, asyncio.Queue())
            self._guests[name] = g
        if uuid and g.st.uuid != uuid:
            g.st = g.st.replace(uuid=uuid)
        return g

    def _ensure_worker(self, g: _Guest) -> None:
        if self._running and (g.worker is None or g.worker.done()):
            g.worker = asyncio.ensure_future(self._worker(g))

    def _wake(self, g: _Guest) -> None:
        g.queue.put_nowait(_Item("wake", None, self._clock.monotonic()))
        self._ensure_worker(g)

    def _selection(self, g: _Guest) -> Selection:
        return select(self._settings, g.st.name, g.st.uuid, g.metadata, g.st.override)

    def _record(self, g: _Guest) -> GuestRecord:
        state, reason = g.live if g.live else (DomainState.NOSTATE, 0)
        return GuestRecord(g.st.name, g.st.uuid, state, reason, g.st.intent)  # type: ignore[arg-type]

    def _raise_alert(self, kind: str, g: _Guest, message: str) -> None:
        a = PolicyAlert(kind, g.st.name, g.st.uuid, message, self._clock.time())
        self.alerts.append(a)
        self._log.warning("policy_alert", alert=kind, guest=g.st.name, uuid=g.st.uuid, msg=message)
        if self._alert_sink is not None:
            try:
                self._alert_sink(a)
            except Exception as err:  # an alert sink must never break the engine
                self._log.error("policy_alert_sink_failed", error=repr(err))

    async def _call(self, what: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a hypervisor call under the engine's own deadline (on top of the port's)."""
        try:
            async with asyncio.timeout(timeout or self._settings.action_timeout):
                return await aw
        except TimeoutError:
            raise HypervisorError(ErrorCode.OPERATION_TIMEOUT, f"{what}: no answer within deadline") from None

    def _is_ours(self, g: _Guest, arrived: float) -> str | None:
        grace = self._settings.own_event_grace
        now = self._clock.monotonic()
        g.ops = [o for o in g.ops if o.ended is None or now - o.ended <= grace]
        hits = [o.op for o in g.ops if o.started <= arrived and (o.ended is None or arrived <= o.ended + grace)]
        # a stop that follows our kill and our restart within the grace is the kill's: prefer stopping ops
        return next((op for op in hits if op in STOPPING_OPS), hits[0] if hits else None)

    async def _tagged(self, g: _Guest, op: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        tag = _OpTag(op, self._clock.monotonic())
        g.ops.append(tag)
        try:
            return await self._call(op, aw, timeout)
        finally:
            tag.ended = self._clock.monotonic()

    def _persist(self, g: _Guest, st: GuestState) -> None:
        g.st = st
        self._store.save_guest(st)

    async def _wait_ready(self) -> None:
        await self._ready.wait()

    async def _refresh_metadata(self, g: _Guest) -> None:
        if g.metadata_known:
            return
        try:
            before = g.metadata
            g.metadata = await self._call("metadata", self._hv.metadata(g.st.name))
            g.metadata_known = True
            if g.metadata != before:
                self._selection_changed(g.st.name)
        except HypervisorError as err:
            if err.code == ErrorCode.NO_DOMAIN:
                g.metadata, g.metadata_known = None, True
            else:
                self._log.warning("policy_metadata_failed", guest=g.st.name, code=err.code, error=err.message)

    def _selection_changed(self, name: str) -> None:
        for listener in list(self.selection_listeners):
            try:
                listener(name)
            except Exception as err:  # a listener must never break the engine
                self._log.error("policy_selection_listener_failed", error=repr(err))

    def console_capture(self, name: str) -> int | None:
        """Guest ``name``'s ``console_buffer`` (KiB) when its merged policy sets
        ``capture_console`` (runtime override, domain metadata once read,
        ``[[match]]`` rules, profile, defaults), else None. Pure lookup; never
        raises, never calls libvirt."""
        g = self._guests.get(name)
        sel = select(self._settings, name, "", None) if g is None else self._selection(g)
        return sel.policy.console_buffer if sel.policy.capture_console else None

    # ------------------------------------------------------------------ worker

    async def _next_item(self, g: _Guest) -> _Item | None:
        """Next queued item, or None when the pending action is due first."""
        if not g.queue.empty():
            return g.queue.get_nowait()
        if g.pending_due is None:
            return await g.queue.get()
        delay = g.pending_due - self._clock.monotonic()
        if delay <= 0:
            return None
        getter = asyncio.ensure_future(g.queue.get())
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        try:
            await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    async def _worker(self, g: _Guest) -> None:
        while self._running:
            try:
                item = await self._next_item(g)
                if item is None:
                    if g.pending_due is not None and g.pending_due <= self._clock.monotonic():
                        await self._wait_ready()
                        await self._run_pending(g)
                    continue
                batch = [item]
                if item.kind == "event" and self._settings.debounce > 0:
                    await self._clock.sleep(self._settings.debounce)
                while not g.queue.empty():
                    batch.append(g.queue.get_nowait())
                await self._wait_ready()
                await self._process(g, batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug must not kill the guest's worker silently
                self._log.exception("policy_worker_error", guest=g.st.name, error=repr(err))
                await self._clock.sleep(1.0)

    async def _process(self, g: _Guest, batch: list[_Item]) -> None:
        await self._refresh_metadata(g)
        for item in batch:
            if item.kind == "event" and item.event is not None:
                await self._process_event(g, item)
            elif item.kind == "resync" and item.state is not None:
                await self._process_resync(g, item.state)
            elif item.kind == "recover":
                await self._process_recover(g, item.why)
            elif item.kind == "crash_timeout" and item.event is not None and g.crash_deferred is item.event:
                g.crash_deferred = None
                await self._process_event(g, item, defer_crash=False)

    def _first_sight(self, g: _Guest, sel: Selection, state: int) -> None:
        if g.st.intent == "unknown":
            g.st = g.st.replace(intent=initial_intent(sel.policy, state))

    async def _process_event(self, g: _Guest, item: _Item, defer_crash: bool = True) -> None:
        ev = item.event
        assert ev is not None
        if ev.kind == "metadata_change" or (ev.kind == "lifecycle" and ev.event == "DEFINED"):
            g.metadata_known = False
            await self._refresh_metadata(g)
        # A guest's own failure (panic, QEMU death, I/O-error or watchdog pause) is never caused by
        # our operation, even when it follows one within own_event_grace (a guest whose disk is
        # full pauses again seconds after we restarted it).
        ours = None if _guest_failure(ev) else self._is_ours(g, item.arrived)
        inp = ClassifyInput(ev.kind, ev.event, ev.detail, g.prev_shutdown, g.watchdog_action, ours,
                            self._host_shutdown)
        cls = classify(inp)
        # context for the next events
        if cls.transition == Transition.SHUTTING_DOWN:
            g.prev_shutdown = ev.detail
        elif ev.kind == "watchdog":
            g.watchdog_action = ev.detail.upper()
        elif cls.transition in (Transition.STARTED, Transition.STOPPED):
            g.prev_shutdown = None
            if cls.transition == Transition.STARTED:
                g.watchdog_action = None
        self._track_live(g, ev, cls)
        if ev.kind == "lifecycle" and ev.event == "UNDEFINED":
            self._forget(g, ev)
            return
        sel = self._selection(g)
        self._first_sight(g, sel, g.live[0] if g.live else DomainState.SHUTOFF)
        if cls.transition == Transition.STARTED:
            self._recover.discard(g.st.name)
        if cls.transition in (Transition.STARTED, Transition.STOPPED):
            g.crash_deferred = None  # the stop that follows a crash is decided on (once) below
        elif (defer_crash and cls.transition == Transition.CRASHED and cls.cause is not None
              and cls.cause.value == "crash" and ev.kind == "lifecycle"):
            # One panic is CRASHED/PANICKED, then STOPPED/CRASHED about a second later
            # (<on_crash> destroy/restart): decide once, on the stop. Only a guest that stays
            # crashed (<on_crash> preserve) is decided on this event, after CRASH_STOP_WAIT.
            g.crash_deferred = ev
            self._store.record_transition(g.st, ev.time, ev.seq, ev.kind, ev.event, ev.detail, ev.payload,
                                          cls.cause.value, "crash noted: waiting for libvirt to stop the guest")
            self._spawn(self._crash_timeout(g, ev))
            return
        if cls.transition in (Transition.NONE, Transition.NOTE, Transition.SHUTTING_DOWN):
            self._store.record_transition(g.st, ev.time, ev.seq, ev.kind, ev.event, ev.detail, ev.payload,
                                          cls.cause.value if cls.cause else None, None)
            return
        d = decide(self._record(g), cls, g.st.history, self._clock.time(), sel, self._rand())
        self._apply(g, d, sel, ev)

    async def _crash_timeout(self, g: _Guest, ev: Event) -> None:
        await self._clock.sleep(CRASH_STOP_WAIT)
        if g.crash_deferred is ev:
            g.queue.put_nowait(_Item("crash_timeout", ev, self._clock.monotonic()))
            self._ensure_worker(g)

    def _track_live(self, g: _Guest, ev: Event, cls: Classification) -> None:
        if ev.kind != "lifecycle":
            return
        m = {"STARTED": (DomainState.RUNNING, RunningReason.RESTORED if ev.detail == "RESTORED" else RunningReason.BOOTED),
             "RESUMED": (DomainState.RUNNING, RunningReason.UNPAUSED),
             "STOPPED": (DomainState.SHUTOFF, 0), "SUSPENDED": (DomainState.PAUSED, 0),
             "CRASHED": (DomainState.CRASHED, 0), "PMSUSPENDED": (DomainState.PMSUSPENDED, 0)}
        if ev.event in m:
            g.live = (int(m[ev.event][0]), int(m[ev.event][1]))

    def _forget(self, g: _Guest, ev: Event) -> None:
        g.gone = True
        g.pending_due = None
        self._store.record_transition(g.st, ev.time, ev.seq, ev.kind, ev.event, ev.detail, ev.payload, None,
                                      "undefined: forgotten")
        self._store.delete_guest(g.st.name)
        g.st = GuestState(name=g.st.name, uuid=g.st.uuid, intent="unknown")

    async def _process_resync(self, g: _Guest, state: tuple[int, int]) -> None:
        g.live = state
        sel = self._selection(g)
        self._first_sight(g, sel, state[0])
        name = g.st.name
        if name in self._recover:
            self._recover.discard(name)
            if g.pending_due is None:
                await self._process_recover(g, "action interrupted by a daemon stop")
                return
        if g.pending_due is not None:
            self._persist(g, g.st)
            return
        cls = classify_state(*state)
        if cls.is_stop and self.boot_flow_pending():
            self._persist(g, g.st)  # off since the host went down: the boot flow decides, not failure handling
            return
        nr = g.st.history.next_retry
        if nr is not None and cls.is_stop and sel.mode == "enforce" and g.st.intent == "running":
            # a retry decided earlier (e.g. in dry-run, or before a reload) but not scheduled: schedule it now
            g.pending_due = self._clock.monotonic() + max(0.0, nr - self._clock.time())
            self._persist(g, g.st.replace(pending_action=g.st.pending_action or "restart"))
            return
        if cls.transition == Transition.STARTED:
            if g.st.intent == "stopped":
                d = decide(self._record(g), cls, g.st.history, self._clock.time(), sel, self._rand())
                self._apply(g, d, sel, None)
            else:
                self._persist(g, g.st.replace(history=budget.record_stable(g.st.history, self._clock.time(), sel.policy)))
            return
        if cls.is_stop and g.st.intent == "running" and not g.st.history.given_up:
            d = decide(self._record(g), cls, g.st.history, self._clock.time(), sel, self._rand())
            self._apply(g, d, sel, None)
            return
        self._persist(g, g.st)

    async def _process_recover(self, g: _Guest, why: str) -> None:
        sel = self._selection(g)
        try:
            g.live = await self._call("state", self._hv.state(g.st.name))
        except HypervisorError as err:
            self._log.warning("policy_state_failed", guest=g.st.name, code=err.code, error=err.message)
            return
        d = decide_recover(self._record(g), g.st.history, self._clock.time(), sel, why)
        self._apply(g, d, sel, None)

    def _apply(self, g: _Guest, d: Decision, sel: Selection, ev: Event | None) -> None:
        """Persist a decision's transition, log it, and (enforce mode) schedule its action."""
        mode = sel.mode
        h = d.history
        pending: str | None = g.st.pending_action
        acting = d.action in (Action.RESTART, Action.RESUME, Action.KILL)
        if mode != "enforce" and h.given_up and not g.st.history.given_up:
            h = h.replace(given_up=False, given_up_reason="")  # dry-run/observe never give up for real
        if acting and mode == "enforce":
            pending = d.action.value
            g.pending_due = self._clock.monotonic() + (0.0 if d.action == Action.KILL else d.delay)
            if d.cause is not None:
                g.last_cause = d.cause.value
        elif acting:
            pending, g.pending_due = None, None  # dry-run/observe: the retry stays virtual (dedups repeats)
        elif not d.keep_pending:
            pending, g.pending_due = None, None
            h = h.replace(next_retry=None)
        st = g.st.replace(intent=d.intent, history=h, pending_action=pending)
        text = d.message(mode)
        if ev is not None:
            self._store.record_transition(st, ev.time, ev.seq, ev.kind, ev.event, ev.detail, ev.payload,
                                          d.cause.value if d.cause else None, f"{d.action.value}: {text}")
            g.st = st
        else:
            self._persist(g, st)
        level = "info" if (d.action != Action.NONE or mode == "enforce") and mode != "observe" else "debug"
        getattr(self._log, level)("policy_decision", guest=g.st.name, uuid=g.st.uuid, action=d.action.value,
                                  cause=d.cause.value if d.cause else None, mode=mode, delay=round(d.delay, 3),
                                  intent=d.intent, key=d.key or None, msg=text)
        if mode == "observe":
            return
        if d.alert and mode == "enforce":
            kind = {Action.GIVE_UP: "given_up"}.get(d.action) or (d.cause.value if d.cause else "policy")
            self._raise_alert(kind, g, d.alert)
        if d.action == Action.GIVE_UP and mode == "enforce":
            self._actions[("give_up", "ok")] += 1
        if acting and mode == "enforce":
            self._wake(g)

    # ------------------------------------------------------------------ actions

    def _breaker_wait(self) -> float:
        """0 when an action may run now, else seconds until the window frees (breaker open)."""
        now = self._clock.monotonic()
        while self._action_times and now - self._action_times[0] >= BREAKER_WINDOW:
            self._action_times.popleft()
        if len(self._action_times) < self._settings.max_actions_per_minute:
            if self._breaker_open:
                self._breaker_open = False
                self._log.warning("policy_breaker_closed")
            return 0.0
        return BREAKER_WINDOW - (now - self._action_times[0])

    async def _run_pending(self, g: _Guest) -> None:
        action = g.st.pending_action
        if action is None:
            g.pending_due = None
            return
        wait = self._breaker_wait()
        if wait > 0:
            g.pending_due = self._clock.monotonic() + wait
            if not self._breaker_open:
                self._breaker_open = True
                self._actions[("breaker", "deferred")] += 1
                self._raise_alert("breaker_open", g, f"more than {self._settings.max_actions_per_minute} policy actions "
                                  f"per minute: actions deferred (next in {wait:.0f} s)")
            return
        sel = self._selection(g)
        if sel.mode != "enforce" or g.st.intent != "running" or g.st.history.given_up:
            self._log.info("policy_pending_dropped", guest=g.st.name, action=action, mode=sel.mode, intent=g.st.intent,
                           given_up=g.st.history.given_up)
            g.pending_due = None
            self._persist(g, g.st.replace(pending_action=None, history=g.st.history.replace(next_retry=None)))
            return
        g.pending_due = None
        self._action_times.append(self._clock.monotonic())
        if action == "resume":
            await self._do_resume(g, sel)
        elif action == "kill":
            await self._do_kill(g, sel)
        else:
            await self._do_restart(g, sel, action)

    async def _do_resume(self, g: _Guest, sel: Selection) -> None:
        now = self._clock.time()
        st = g.st.replace(pending_action=None, history=budget.record_resume(g.st.history, now))
        aid = self._store.begin_action(st, "resume", "I/O error pause")
        g.st = st
        try:
            await self._tagged(g, "resume", self._hv.resume(g.st.name))
            result, detail = "ok", ""
        except HypervisorError as err:
            result, detail = ("ok", "not paused any more") if err.code == ErrorCode.OPERATION_INVALID else ("failed", err.message)
        self._actions[("resume", result)] += 1
        self._store.finish_action(aid, result, detail, g.st)
        self._log.info("policy_action", guest=g.st.name, uuid=g.st.uuid, action="resume", result=result, detail=detail)

    async def _do_kill(self, g: _Guest, sel: Selection) -> None:
        st = g.st.replace(pending_action="restart")
        aid = self._store.begin_action(st, "kill", "policy on_io_error = kill")
        g.st = st
        try:
            await self._tagged(g, "kill", self._hv.destroy(g.st.name))
            result, detail = "ok", ""
        except HypervisorError as err:
            result, detail = ("ok", "not running") if err.code == ErrorCode.OPERATION_INVALID else ("failed", err.message)
        self._actions[("kill", result)] += 1
        self._store.finish_action(aid, result, detail, g.st)
        self._log.info("policy_action", guest=g.st.name, uuid=g.st.uuid, action="kill", result=result, detail=detail)
        nr = g.st.history.next_retry
        delay = max(0.0, (nr - self._clock.time())) if nr is not None else 0.0
        g.pending_due = self._clock.monotonic() + delay

    async def _do_restart(self, g: _Guest, sel: Selection, action: str) -> None:
        name = g.st.name
        try:
            state, reason = await self._call("state", self._hv.state(name))
        except HypervisorError as err:
            self._after_start_error(g, sel, err, "state")
            return
        g.live = (state, reason)
        if state in (DomainState.RUNNING, DomainState.BLOCKED):
            st = g.st.replace(pending_action=None, history=budget.record_start(g.st.history, self._clock.time(), sel.policy))
            self._persist(g, st)
            self._actions[("restart", "already_running")] += 1
            self._log.info("policy_action", guest=name, uuid=g.st.uuid, action="restart", result="already_running")
            return
        if state in ACTIVE_STATES:
            try:
                await self._tagged(g, "destroy", self._hv.destroy(name))
            except HypervisorError as err:
                if err.code != ErrorCode.OPERATION_INVALID:
                    self._after_start_error(g, sel, err, "destroy")
                    return
        h = g.st.history
        why = f"restart, attempt {h.attempt}" if h.attempt else "restart (recover)"
        await self._start_guest(g, sel, reason_text=why, count_restart=True)

    async def _start_guest(self, g: _Guest, sel: Selection, reason_text: str, count_restart: bool) -> str:
        """Start (or restore) a guest under the semaphores, journalled. Returns ok/restored/failed/...."""
        name = g.st.name
        try:
            has_save = await self._call("has_managed_save", self._hv.has_managed_save(name))
        except HypervisorError:
            has_save = False
        sem = self._restores if has_save else self._starts
        action = "restore" if has_save else "start"
        h = g.st.history.replace(next_retry=None)
        if count_restart:
            h = budget.record_restart(h, g.last_cause or self._last_cause(g) or "recover")
        st = g.st.replace(pending_action=None, history=h)
        async with sem:
            aid = self._store.begin_action(st, action, reason_text)
            g.st = st
            try:
                await self._tagged(g, "start", self._hv.start(name))
                result = "restored" if has_save else "ok"
                detail = ""
            except HypervisorError as err:
                if not err.already_running and not err.permanent and await self._is_running(name):
                    err = HypervisorError(ErrorCode.OPERATION_INVALID, err.message)  # some drivers use other codes
                if err.already_running:
                    result, detail = "already_running", err.message
                elif has_save:
                    result, detail = await self._restore_failed(g, sel, err, aid)
                    return result
                else:
                    self._actions[(action, "failed")] += 1
                    self._store.finish_action(aid, "failed", f"[{err.code}] {err.message}", g.st)
                    self._after_start_error(g, sel, err, action)
                    return "failed"
        now = self._clock.time()
        g.st = g.st.replace(history=budget.record_start(g.st.history, now, sel.policy), intent=g.st.intent
                            if g.st.intent == "held" else "running")
        if has_save and result == "restored":
            try:
                state, reason = await self._call("state", self._hv.state(name))
                g.live = (state, reason)
                if state == DomainState.RUNNING and reason == RunningReason.BOOTED:
                    self._raise_alert("image_not_used", g, f"{name}: managed-save image was not used (STARTED_BOOTED, "
                                      "not STARTED_RESTORED): the guest cold-booted")
                    detail = "image not used: cold boot"
            except HypervisorError:
                pass
        self._actions[(action, result)] += 1
        self._store.finish_action(aid, result, detail, g.st)
        self._log.info("policy_action", guest=name, uuid=g.st.uuid, action=action, result=result, detail=detail)
        return result

    async def _is_running(self, name: str) -> bool:
        try:
            state, _ = await self._call("state", self._hv.state(name))
        except HypervisorError:
            return False
        return state in (DomainState.RUNNING, DomainState.BLOCKED)

    def _last_cause(self, g: _Guest) -> str | None:
        rows = self._store.events(g.st.name, limit=20)
        for r in rows:
            if r["cause"] and r["cause"] not in ("ours", "host_shutdown"):
                return str(r["cause"])
        return None

    async def _restore_failed(self, g: _Guest, sel: Selection, err: HypervisorError, aid: int) -> tuple[str, str]:
        name = g.st.name
        how = sel.policy.on_restore_failure
        self._actions[("restore", "failed")] += 1
        self._store.finish_action(aid, "failed", f"[{err.code}] {err.message}", g.st)
        if how == "keep":
            msg = (f"{name}: managed-save image cannot be restored ([{err.code}] {err.message}); image kept, guest left off "
                   "(on_restore_failure = keep)")
            self._raise_alert("restore_failed", g, msg)
            self._persist(g, g.st.replace(history=budget.give_up(g.st.history, "managed-save image cannot be restored")))
            return "failed", msg
        self._log.warning("policy_restore_discard", guest=name, uuid=g.st.uuid, how=how, code=err.code,
                          msg=f"{name}: managed-save image cannot be restored: discarding it and cold-booting (on_restore_failure = {how}); "
                              "the guest's saved RAM state is lost")
        self._raise_alert("restore_failed", g, f"{name}: restore failed, image discarded, cold boot ({how})")
        st = g.st
        aid2 = self._store.begin_action(st, "force-boot" if how == "force-boot" else "discard-and-boot", "restore failed")
        try:
            if how == "discard":
                await self._tagged(g, "remove_managed_save", self._hv.remove_managed_save(name))
                await self._tagged(g, "start", self._hv.start(name))
            else:
                await self._tagged(g, "start", self._hv.start(name, force_boot=True))
        except HypervisorError as err2:
            if not err2.already_running:
                self._store.finish_action(aid2, "failed", f"[{err2.code}] {err2.message}", g.st)
                self._actions[(how, "failed")] += 1
                self._after_start_error(g, sel, err2, how)
                return "failed", err2.message
        g.st = g.st.replace(history=budget.record_start(g.st.history, self._clock.time(), sel.policy))
        self._store.finish_action(aid2, "ok", "", g.st)
        self._actions[(how, "ok")] += 1
        return "discarded", ""

    def _after_start_error(self, g: _Guest, sel: Selection, err: HypervisorError, what: str) -> None:
        """A start (or its preparation) failed: give up on permanent errors, else count a failure and retry."""
        now = self._clock.time()
        pol = sel.policy
        if err.permanent:
            h = budget.give_up(g.st.history, f"{what} failed permanently: [{err.code}] {err.message}")
        else:
            h = budget.record_failure(g.st.history, now, pol, f"{what} failed: [{err.code}] {err.message}")
        if h.given_up:
            self._persist(g, g.st.replace(history=h, pending_action=None))
            g.pending_due = None
            self._actions[("give_up", "ok")] += 1
            self._raise_alert("given_up", g, f"give up {g.st.name}: {h.given_up_reason}")
            return
        delay = budget.backoff_delay(h.attempt, pol, self._rand())
        h = budget.schedule(h, now + delay)
        self._persist(g, g.st.replace(history=h, pending_action="restart"))
        g.pending_due = self._clock.monotonic() + delay
        self._raise_alert("start_failed", g, f"{what} {g.st.name} failed ([{err.code}] {err.message}); "
                          f"retry in {delay:.0f} s, attempt {len(budget.window(h, now, pol))}/{pol.limit_burst}")

    # ------------------------------------------------------------------ operator commands

    def _known(self, name: str) -> _Guest:
        g = self._guests.get(name)
        if g is None:
            st = self._store.get_guest(name)
            if st is None:
                raise KeyError(name)
            g = self._guest(name, st.uuid, st)
        return g

    def hold(self, name: str) -> GuestSnapshot:
        """Operator hold: intent ``held``, pending action cancelled; nothing acts on the guest. Raises KeyError."""
        g = self._known(name)
        g.pending_due = None
        self._persist(g, g.st.replace(intent="held", pending_action=None, history=g.st.history.replace(next_retry=None)))
        self._log.info("policy_hold", guest=name, uuid=g.st.uuid)
        return self._snap(g)

    def release(self, name: str) -> GuestSnapshot:
        """Release a hold: intent follows the live state (running if active, else stopped). Raises KeyError."""
        g = self._known(name)
        active = g.live is not None and g.live[0] in ACTIVE_STATES
        self._persist(g, g.st.replace(intent="running" if active else "stopped"))
        self._log.info("policy_release", guest=name, uuid=g.st.uuid, intent=g.st.intent)
        return self._snap(g)

    def reset(self, name: str) -> GuestSnapshot:
        """Operator reset: clear given-up, failures and backoff; restart at once if intent is running and it is off.

        Raises KeyError for an unknown guest.
        """
        g = self._known(name)
        g.pending_due = None
        st = g.st.replace(history=budget.reset(g.st.history), pending_action=None)
        self._persist(g, st)
        self._log.info("policy_reset", guest=name, uuid=g.st.uuid)
        if st.intent == "running":
            g.queue.put_nowait(_Item("recover", None, self._clock.monotonic(), why="operator reset"))
            self._ensure_worker(g)
        return self._snap(g)

    def set_override(self, name: str, values: Mapping[str, Any] | None) -> GuestSnapshot:
        """Replace (or clear with None/{}) the runtime policy override of a guest: per-guest
        keys, ``profile``, ``mode``, validated by :func:`~virtwatch.policy.select.validate_override`
        and persisted. Raises KeyError (unknown guest), ValueError (naming every bad key)."""
        g = self._known(name)
        clean = validate_override(values or {}, self._settings)
        self._persist(g, g.st.replace(override=MappingProxyType(clean)))
        self._log.info("policy_override", guest=name, uuid=g.st.uuid, override=clean)
        self._selection_changed(name)
        return self._snap(g)

    # ------------------------------------------------------------------ introspection

    def _snap(self, g: _Guest) -> GuestSnapshot:
        sel = self._selection(g)
        h = g.st.history
        return GuestSnapshot(g.st.name, g.st.uuid, g.st.intent, sel.managed, sel.mode, h.given_up, h.given_up_reason,
                             h.next_retry, g.st.pending_action, h.attempt,
                             len(budget.window(h, self._clock.time(), sel.policy)), MappingProxyType(dict(h.restarts)),
                             g.live[0] if g.live else None, g.live[1] if g.live else None,
                             MappingProxyType(dict(g.st.override)))

    def snapshot(self) -> EngineSnapshot:
        """Current state for metrics/status (guests that vanished are left out)."""
        guests = {n: self._snap(g) for n, g in sorted(self._guests.items()) if not g.gone}
        return EngineSnapshot(self.ready, self._host_shutdown, self._breaker_open,
                              MappingProxyType(dict(self._actions)), MappingProxyType(guests))

    def explain(self, name: str) -> Explanation:
        """Merged policy with sources and the decision the engine would take now. Raises KeyError."""
        g = self._known(name)
        sel = self._selection(g)
        if g.live is None:
            now_text = "state unknown (not yet resynced)"
        else:
            cls = classify_state(*g.live)
            if g.st.pending_action:
                now_text = f"{g.st.pending_action} pending at {g.st.history.next_retry}"
            elif cls.transition == Transition.STARTED:
                now_text = f"{name} is running: nothing to do"
            elif cls.is_stop:
                d = decide(self._record(g), cls, g.st.history, self._clock.time(), sel, 0.0)
                now_text = d.message(sel.mode)
            else:
                now_text = cls.note or "nothing to do"
        return Explanation(name, g.st.uuid, sel.managed, sel.mode, sel.mode_source, g.st.intent,
                           g.live[0] if g.live else None, g.live[1] if g.live else None,
                           MappingProxyType(sel.policy.model_dump()), sel.sources, sel.matched, sel.errors,
                           g.st.history, g.st.pending_action, now_text)

    # ------------------------------------------------------------------ boot flow

    async def _settle(self) -> None:
        s = self._settings
        if s.boot_settle_timeout <= 0:
            return
        start = self._clock.monotonic()
        last: list[tuple[str, int]] | None = None
        quiet_since = start
        while self._clock.monotonic() - start < s.boot_settle_timeout:
            try:
                cur = sorted((i.name, i.state) for i in await self._call("list_guests", self._hv.list_guests()))
            except HypervisorError:
                cur = None
            now = self._clock.monotonic()
            if cur != last:
                last, quiet_since = cur, now
            elif now - quiet_since >= s.boot_settle_quiet:
                self._log.info("policy_boot_settled", after_seconds=round(now - start, 3))
                return
            await self._clock.sleep(POLL_INTERVAL)
        self._log.warning("policy_boot_settle_timeout", timeout=s.boot_settle_timeout)

    async def run_boot_flow(self) -> BootReport:
        """Once per host boot: start/restore candidate guests by priority then name.

        Candidates: managed, persistent, shut off after libvirt's autostart
        settled, not held or given up, not seen stopping by a lifecycle event
        since this daemon started (that event's own decision stands), and
        ``autostart`` is ``always`` or ``was-running`` with intent running or
        saved by the save path. The boot
        id and the candidate list are persisted first, each guest is cleared
        as it is handled: a daemon restart mid-flow resumes, replaying nothing.
        Raises OSError when the boot id cannot be read.
        """
        async with self._boot_lock:
            return await self._run_boot_flow()

    async def _run_boot_flow(self) -> BootReport:
        boot_id = read_boot_id(self._boot_id_path)
        self._boot_id = boot_id
        await self._wait_ready()
        log = self._log.bind(boot_id=boot_id)
        if self._store.get_meta("boot_id") != boot_id:
            await self._settle()
            infos = await self._call("list_guests", self._hv.list_guests())
            marked: list[GuestState] = []
            for info in infos:
                g = self._guest(info.name, info.uuid)
                g.live = (info.state, info.reason)
                await self._refresh_metadata(g)
                sel = self._selection(g)
                self._first_sight(g, sel, info.state)
                pol = sel.policy
                want = pol.autostart == "always" or (
                    pol.autostart == "was-running" and (g.st.intent == "running" or g.st.was_running))
                ok = (sel.managed and info.persistent and info.state == DomainState.SHUTOFF and want
                      and g.st.intent != "held" and not g.st.history.given_up and g.stop_seen != boot_id)
                if ok:
                    g.st = g.st.replace(boot_pending=boot_id)
                    marked.append(g.st)
            self._store.begin_boot(boot_id, marked)
            log.info("policy_boot_flow", candidates=[s.name for s in marked])
        else:
            log.info("policy_boot_flow_resume")
        todo = [g for g in self._guests.values() if g.st.boot_pending == boot_id and not g.gone]
        todo.sort(key=lambda g: (-self._selection(g).policy.priority, g.st.name))
        if not todo:
            return BootReport(boot_id, skipped=True)
        started: list[str] = []
        restored: list[str] = []
        failed: list[str] = []
        would: list[str] = []

        async def one(g: _Guest) -> None:
            sel = self._selection(g)
            name = g.st.name
            try:
                if sel.mode != "enforce":
                    would.append(name)
                    log.info("policy_boot_would_start", guest=name, mode=sel.mode)
                    return
                state, _ = await self._call("state", self._hv.state(name))
                if state in ACTIVE_STATES:
                    return
                if g.stop_seen == boot_id or g.st.intent == "held":
                    # started and stopped again while the flow waited (an admin destroy, a crash):
                    # that stop's own event decides, the boot flow must not undo it
                    log.info("policy_boot_skip", guest=name, intent=g.st.intent,
                             why="stopped while watched" if g.stop_seen == boot_id else f"intent {g.st.intent}")
                    return
                res = await self._start_guest(g, sel, "boot flow", count_restart=False)
                if res == "restored":
                    restored.append(name)
                elif res in ("ok", "already_running", "discarded"):
                    started.append(name)
                else:
                    failed.append(name)
            except HypervisorError as err:
                failed.append(name)
                log.warning("policy_boot_start_failed", guest=name, code=err.code, error=err.message)
            finally:
                self._persist(g, g.st.replace(boot_pending=None, was_running=False))

        tasks = []
        for i, g in enumerate(todo):
            if i and self._settings.start_delay > 0:
                await self._clock.sleep(self._settings.start_delay)
            tasks.append(asyncio.ensure_future(one(g)))
        await asyncio.gather(*tasks)
        report = BootReport(boot_id, False, tuple(started), tuple(restored), tuple(failed), tuple(would))
        log.info("policy_boot_flow_done", started=report.started, restored=report.restored, failed=report.failed,
                 would_start=report.would_start)
        return report

    # ------------------------------------------------------------------ host shutdown

    def libvirt_guests_status(self) -> Any:
        """:func:`~virtwatch.policy.host.libvirt_guests_active` on the configured paths."""
        return libvirt_guests_active(self._lg_paths)

    async def save_guests(self) -> SaveReport:
        """Host-shutdown save path (``virtwatch guests-save``).

        Refuses (and logs why) when libvirt-guests owns host shutdown.
        Otherwise marks the host as shutting down, records which managed guests
        were running (``was_running``), and for each runs the ``on_host_shutdown``
        steps in order, each bounded by its timeout, until one stops the guest.
        """
        status = self.libvirt_guests_status()
        if status.active:
            self._log.warning("policy_save_refused", why=status.why,
                              msg="libvirt-guests handles host shutdown; virtwatch does not save guests")
            return SaveReport(True, status.why)
        self._host_shutdown = True
        infos = await self._call("list_guests", self._hv.list_guests())
        targets: list[tuple[_Guest, Selection]] = []
        for info in infos:
            g = self._guest(info.name, info.uuid)
            g.live = (info.state, info.reason)
            await self._refresh_metadata(g)
            sel = self._selection(g)
            if sel.managed and info.state in ACTIVE_STATES:
                targets.append((g, sel))
        marked = [g.st.replace(was_running=True) for g, _ in targets]
        self._store.save_guests(marked)
        for (g, _), st in zip(targets, marked):
            g.st = st
        results: dict[str, str] = {}
        sem = asyncio.Semaphore(self._settings.max_parallel_saves)

        async def one(g: _Guest, sel: Selection) -> None:
            async with sem:
                if sel.mode != "enforce":
                    results[g.st.name] = f"would {sel.policy.on_host_shutdown[0].action}"
                    return
                results[g.st.name] = await self._save_one(g, sel.policy.on_host_shutdown)

        await asyncio.gather(*(one(g, s) for g, s in targets))
        self._log.info("policy_save_done", results=results)
        return SaveReport(False, status.why, MappingProxyType(results))

    async def _save_one(self, g: _Guest, steps: tuple[ShutdownStep, ...]) -> str:
        name = g.st.name
        for step in steps:
            aid = self._store.begin_action(g.st, step.action, "host shutdown")
            try:
                if step.action == "managedsave":
                    await self._tagged(g, "managedsave", self._hv.managed_save(name), step.timeout)
                elif step.action == "destroy":
                    await self._tagged(g, "destroy", self._hv.destroy(name), step.timeout)
                else:
                    await self._tagged(g, "shutdown", self._shutdown_and_wait(name, step.timeout), step.timeout + 1)
                self._store.finish_action(aid, "ok", "", g.st)
                self._actions[(step.action, "ok")] += 1
                self._log.info("policy_save_step", guest=name, uuid=g.st.uuid, step=step.action, result="ok")
                return step.action
            except HypervisorError as err:
                self._store.finish_action(aid, "failed", f"[{err.code}] {err.message}", g.st)
                self._actions[(step.action, "failed")] += 1
                self._log.warning("policy_save_step", guest=name, uuid=g.st.uuid, step=step.action, result="failed",
                                  code=err.code, error=err.message)
        return "failed"

    async def _shutdown_and_wait(self, name: str, timeout: float) -> None:
        await self._hv.shutdown(name)
        start = self._clock.monotonic()
        while self._clock.monotonic() - start < timeout:
            state, _ = await self._hv.state(name)
            if state == DomainState.SHUTOFF:
                return
            await self._clock.sleep(min(POLL_INTERVAL, timeout))
        raise HypervisorError(ErrorCode.OPERATION_TIMEOUT, f"{name} did not power off within {timeout:g} s")
