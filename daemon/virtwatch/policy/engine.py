"""The policy engine: events in, decisions out, actions carried out with guards.

- :meth:`PolicyEngine.on_event` only enqueues (safe to call from the event pump).
- One worker task per guest: it coalesces a burst of events (``debounce``),
  classifies them in order with the guest's context (preceding SHUTDOWN
  detail, watchdog action, our own in-flight operation), calls the pure
  :func:`~virtwatch.policy.decide.decide`, persists every transition
  (:class:`~virtwatch.policy.store.AsyncStore`, one transaction each, off the
  loop) and runs the scheduled action when it is due.
- Guards: nothing is decided while :meth:`set_ready` is False; a circuit
  breaker defers actions beyond ``max_actions_per_minute``; starts and
  restores are bounded by semaphores; every libvirt call has a deadline.
- Own operations are tagged: events arriving while one runs (and
  ``own_event_grace`` seconds after) are classified as ours.
- Modes: ``enforce`` acts; ``dry-run`` logs "would ..." and journals the
  decision; ``observe`` only tracks state.

This module is the intake and the per-guest worker; the engine's other parts
work on the same guests through :mod:`~virtwatch.policy.guests` (the guest
table and the action journal) and never call back into it: running actions
(:mod:`~virtwatch.policy.actions`), the boot flow (:mod:`~virtwatch.policy.boot`,
:meth:`PolicyEngine.run_boot_flow`), the host-shutdown save path
(:mod:`~virtwatch.policy.shutdown`, :meth:`PolicyEngine.save_guests`) and the
operator commands and introspection (:mod:`~virtwatch.policy.operator`:
:meth:`PolicyEngine.hold`, ``release``, ``reset``, ``set_override``, ``explain``,
``snapshot``). Their decisions are pure functions in :mod:`~virtwatch.policy.decide`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from ..model import DomainState, Event, Kind, Lifecycle, Source, is_guest_failure, lifecycle_state
from . import budget
from .actions import ActionRunner
from .boot import BootFlow
from .classify import LIVENESS_CAUSES, Classification, ClassifyInput, StopCause, Transition, classify, classify_state
from .clock import Clock, SystemClock
from .config import GuestPolicy, PolicySettings
from .decide import Action, Decision, ResyncStep, decide, decide_liveness, decide_recover, resync_step
from .guests import ActionJournal, GuestTable
from .host import BOOT_ID_PATH, LibvirtGuestsPaths
from .model import (
    BootReport,
    EngineSnapshot,
    Explanation,
    GuestEntry,
    GuestSnapshot,
    GuestState,
    PolicyAlert,
    SaveReport,
    WorkItem,
)
from .operator import Operator
from .ports import ErrorCode, Hypervisor, HypervisorError
from .select import Selection, select
from .shutdown import SavePath
from .store import AsyncStore

#: seconds to wait, after a CRASHED event, for libvirt's STOPPED/CRASHED before deciding on the crash itself
CRASH_STOP_WAIT = 10.0


class PolicyEngine:
    """Keeps guests running by policy.

    Args:
        settings: the ``[policy]`` section (a reload builds a new engine on the same store).
        hypervisor: the :class:`~virtwatch.policy.ports.Hypervisor` port.
        store: an open :class:`~virtwatch.policy.store.AsyncStore`. The engine reads it once, in
            :meth:`start`; after that its memory is the state and the store its durable copy.
        clock: time source (``SystemClock()``).
        rand: random source in [0, 1) for jitter.
        alert: called with each :class:`PolicyAlert` (must not block).
        boot_id_path: file holding the host boot id.
        libvirt_guests: where to detect libvirt-guests.
        auto_boot_flow: run :meth:`run_boot_flow` by itself when first ready on a new boot
            (before reconciling); until the boot flow has run, stops seen at resync are
            treated as the host's shutdown, never as failures.
        logger: a structlog logger.
        action_counts: the previous engine's ``snapshot().actions`` at a reload (counters go on).

    Attributes:
        selection_listeners: called with a guest name when its merged policy may
            have changed (domain metadata read or changed, runtime override set);
            the console capture re-checks ``capture_console`` there.
        decision_listeners: called with ``(guest, cause, decision text)`` for each enforced
            decision on a cause that raised no policy alert (a restart after a crash, say).
    """

    def __init__(self, settings: PolicySettings, hypervisor: Hypervisor, store: AsyncStore, *,
                 clock: Clock | None = None, rand: Callable[[], float] | None = None,
                 alert: Callable[[PolicyAlert], None] | None = None,
                 boot_id_path: str | Path = BOOT_ID_PATH,
                 libvirt_guests: LibvirtGuestsPaths = LibvirtGuestsPaths(),
                 auto_boot_flow: bool = True,
                 logger: Any = None, action_counts: Mapping[tuple[str, str], int] | None = None) -> None:
        self._log = logger or structlog.get_logger("virtwatch.policy")
        self._t = GuestTable(settings, hypervisor, store, clock or SystemClock(), alert, self._log)
        self._journal = ActionJournal(store, self._log, action_counts)
        self._settings = settings
        self._hv = hypervisor
        self._store = store
        self._clock = self._t.clock
        self._rand = rand or random.Random().random
        self._ready = asyncio.Event()
        self._running = False
        self._recover: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._actions = ActionRunner(self._t, self._journal, self._rand)
        self.alerts = self._t.alerts
        self._auto_boot = auto_boot_flow
        self._boot = BootFlow(self._t, self._actions, boot_id_path, self._ready.wait)
        self._save = SavePath(self._t, self._journal, libvirt_guests)
        self._ops = Operator(self._t, self._queue_recover)
        self.selection_listeners = self._t.selection_listeners
        self.decision_listeners: list[Callable[[str, str, str], None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load persisted state, close interrupted actions, start workers for guests with a pending retry."""
        if self._running:
            return
        states = await self._store.load_guests()
        interrupted = await self._store.interrupted_actions()
        boot_handled = await self._store.get_meta("boot_id")
        if self._running:  # a concurrent start() got there first
            return
        self._running = True
        self._boot.load(boot_handled)
        for g in self._t.load(states):
            st = g.st
            if st.pending_action and st.history.next_retry is not None:
                delay = max(0.0, st.history.next_retry - self._clock.time())
                g.pending_due = self._clock.monotonic() + delay
                self._log.info("policy_pending_reloaded", guest=st.name, uuid=st.uuid, action=st.pending_action,
                               in_seconds=round(delay, 3))
                self._wake(g)
        for row in interrupted:
            self._recover.add(row.guest)
            self._log.warning("policy_action_interrupted", guest=row.guest, action=row.action, action_id=row.id,
                              msg="checking the guest's real state at the next resync instead of repeating it")
        await self._journal.close_interrupted(interrupted)

    async def stop(self) -> None:
        """Cancel workers and background tasks (pending retries stay persisted)."""
        self._running = False
        tasks = [g.worker for g in self._t.guests.values() if g.worker] + list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for g in self._t.guests.values():
            g.worker = None

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
        return self._boot.pending()

    async def run_boot_flow(self) -> BootReport:
        """Once per host boot: start/restore candidate guests by priority then name
        (:class:`~virtwatch.policy.boot.BootFlow`); a second run in the same boot is
        ``skipped``. Raises OSError when the boot id cannot be read."""
        return await self._boot.run()

    @property
    def ready(self) -> bool:
        """Whether decisions may be taken."""
        return self._ready.is_set()

    # ------------------------------------------------------------------ intake

    def on_event(self, event: Event) -> None:
        """Enqueue one domain event (non-domain events are ignored). Never blocks, never raises."""
        if event.source != Source.DOMAIN or not event.name:
            return
        g = self._t.get(event.name, event.uuid)
        if event.kind == Kind.LIFECYCLE and event.event in (Lifecycle.STOPPED, Lifecycle.CRASHED):
            # stopped under our eyes in this boot: its own event decides, not the boot flow
            g.stop_seen = self._boot.boot_id
        g.queue.put_nowait(WorkItem("event", event, self._clock.monotonic()))
        self._ensure_worker(g)

    def on_liveness(self, name: str, cause: str, detail: str) -> None:
        """Enqueue a liveness failure of guest ``name`` (``cause``: ``probe_failed``,
        ``console_panic``, ``reboot_loop`` or ``hung``; ``detail``: what the detector saw).
        Decided like a crash (:func:`~virtwatch.policy.decide.decide_liveness`). Never blocks;
        raises ValueError for another cause."""
        if StopCause(cause) not in LIVENESS_CAUSES:
            raise ValueError(f"not a liveness cause: {cause}")
        g = self._t.get(name)
        g.queue.put_nowait(WorkItem("liveness", None, self._clock.monotonic(), why=detail, cause=cause))
        self._ensure_worker(g)

    def own_operation(self, name: str) -> str | None:
        """Our operation (``reset``, ``destroy``, ``start``...) on ``name`` running now or ended
        within ``own_event_grace``, or None: an event arriving now is its doing."""
        g = self._t.guests.get(name)
        return self._t.is_ours(g, self._clock.monotonic()) if g is not None else None

    async def resync(self) -> None:
        """Reconcile with libvirt's current guest list (after every (re)connect). Errors are logged."""
        try:
            infos = await self._t.call("list_guests", self._hv.list_guests())
        except HypervisorError as err:
            self._log.warning("policy_resync_failed", code=err.code, error=err.message)
            return
        seen = set()
        for info in infos:
            seen.add(info.name)
            g = self._t.get(info.name, info.uuid)
            g.gone = False
            g.metadata_known = False
            g.queue.put_nowait(WorkItem("resync", None, self._clock.monotonic(), (info.state, info.reason)))
            self._ensure_worker(g)
        for name, g in self._t.guests.items():
            if name not in seen and not g.gone:
                g.gone = True

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _ensure_worker(self, g: GuestEntry) -> None:
        if self._running and (g.worker is None or g.worker.done()):
            g.worker = asyncio.ensure_future(self._worker(g))

    def _queue_recover(self, g: GuestEntry, why: str) -> None:
        g.queue.put_nowait(WorkItem("recover", None, self._clock.monotonic(), why=why))
        self._ensure_worker(g)

    def _wake(self, g: GuestEntry) -> None:
        g.queue.put_nowait(WorkItem("wake", None, self._clock.monotonic()))
        self._ensure_worker(g)

    async def _wait_ready(self) -> None:
        await self._ready.wait()

    # ------------------------------------------------------------------ worker

    async def _next_item(self, g: GuestEntry) -> WorkItem | None:
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

    async def _worker(self, g: GuestEntry) -> None:
        while self._running:
            try:
                item = await self._next_item(g)
                if item is None:
                    if g.pending_due is not None and g.pending_due <= self._clock.monotonic():
                        await self._wait_ready()
                        await self._actions.run_pending(g)
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

    async def _process(self, g: GuestEntry, batch: list[WorkItem]) -> None:
        await self._t.refresh_metadata(g)
        for item in batch:
            if item.kind == "event" and item.event is not None:
                await self._process_event(g, item)
            elif item.kind == "resync" and item.state is not None:
                await self._process_resync(g, item.state)
            elif item.kind == "recover":
                await self._process_recover(g, item.why)
            elif item.kind == "liveness" and item.cause is not None:
                await self._process_liveness(g, StopCause(item.cause), item.why)
            elif item.kind == "crash_timeout" and item.event is not None and g.crash_deferred is item.event:
                g.crash_deferred = None
                await self._process_event(g, item, defer_crash=False)

    async def _process_event(self, g: GuestEntry, item: WorkItem, defer_crash: bool = True) -> None:
        ev = item.event
        assert ev is not None
        if ev.kind == Kind.METADATA_CHANGE or (ev.kind == Kind.LIFECYCLE and ev.event == Lifecycle.DEFINED):
            g.metadata_known = False
            await self._t.refresh_metadata(g)
        # A guest's own failure (panic, QEMU death, I/O-error or watchdog pause) is never caused by
        # our operation, even when it follows one within own_event_grace (a guest whose disk is
        # full pauses again seconds after we restarted it).
        ours = None if is_guest_failure(ev.kind, ev.event, ev.detail) else self._t.is_ours(g, item.arrived)
        inp = ClassifyInput(
            ev.kind, ev.event, ev.detail, g.prev_shutdown, g.watchdog_action, ours, self._t.host_shutdown,
            g.migrating_in,
        )
        cls = classify(inp)
        self._track_migration(g, cls)
        # context for the next events
        if cls.transition == Transition.SHUTTING_DOWN:
            g.prev_shutdown = ev.detail
        elif ev.kind == Kind.WATCHDOG:
            g.watchdog_action = ev.detail.upper()
        elif cls.transition in (Transition.STARTED, Transition.STOPPED):
            g.prev_shutdown = None
            if cls.transition == Transition.STARTED:
                g.watchdog_action = None
        self._track_live(g, ev, cls)
        if ev.kind == Kind.LIFECYCLE and ev.event == Lifecycle.UNDEFINED:
            await self._forget(g, ev)
            return
        sel = self._t.selection(g)
        # an incoming copy is not running here yet: a guest first seen that way starts as "stopped"
        live = g.live[0] if g.live and cls.transition != Transition.MIGRATING_IN else DomainState.SHUTOFF
        self._t.first_sight(g, sel, live)
        if cls.transition == Transition.STARTED:
            self._recover.discard(g.st.name)
        if cls.transition in (Transition.STARTED, Transition.STOPPED):
            g.crash_deferred = None  # the stop that follows a crash is decided on (once) below
        elif (
            defer_crash
            and cls.transition == Transition.CRASHED
            and cls.cause is not None
            and cls.cause.value == "crash"
            and ev.kind == Kind.LIFECYCLE
        ):
            # One panic is CRASHED/PANICKED, then STOPPED/CRASHED about a second later
            # (<on_crash> destroy/restart): decide once, on the stop. Only a guest that stays
            # crashed (<on_crash> preserve) is decided on this event, after CRASH_STOP_WAIT.
            g.crash_deferred = ev
            await self._record(g.st, ev, cls.cause.value, "crash noted: waiting for libvirt to stop the guest")
            self._spawn(self._crash_timeout(g, ev))
            return
        if cls.transition in (Transition.NONE, Transition.NOTE, Transition.SHUTTING_DOWN):
            await self._record(g.st, ev, cls.cause.value if cls.cause else None, None)
            return
        d = decide(self._t.record(g), cls, g.st.history, self._clock.time(), sel, self._rand())
        await self._apply(g, d, sel, ev)

    async def _record(self, st: GuestState, ev: Event, cause: str | None, decision: str | None) -> None:
        """Journal ``ev`` with the guest's state ``st``, in one transaction
        (:meth:`~virtwatch.policy.store.AsyncStore.record_transition`)."""
        await self._store.record_transition(st, ev.time, ev.seq, ev.kind, ev.event, ev.detail, ev.payload, cause,
                                            decision)

    async def _crash_timeout(self, g: GuestEntry, ev: Event) -> None:
        await self._clock.sleep(CRASH_STOP_WAIT)
        if g.crash_deferred is ev:
            g.queue.put_nowait(WorkItem("crash_timeout", ev, self._clock.monotonic()))
            self._ensure_worker(g)

    @staticmethod
    def _track_migration(g: GuestEntry, cls: Classification) -> None:
        """Incoming-migration context for the next events; a guest that runs here has not
        migrated away (any more)."""
        if cls.transition == Transition.MIGRATING_IN:
            g.migrating_in = True
        elif cls.transition in (Transition.MIGRATED_IN, Transition.STARTED, Transition.STOPPED):
            g.migrating_in = False
        if cls.transition in (Transition.MIGRATED_IN, Transition.STARTED) and g.st.migrated_to is not None:
            g.st = g.st.replace(migrated_to=None)

    def _track_live(self, g: GuestEntry, ev: Event, cls: Classification) -> None:
        live = lifecycle_state(ev.event, ev.detail) if ev.kind == Kind.LIFECYCLE else None
        if live is not None:
            g.live = live

    async def _forget(self, g: GuestEntry, ev: Event) -> None:
        g.gone = True
        g.pending_due = None
        old, g.st = g.st, GuestState(name=g.st.name, uuid=g.st.uuid, intent="unknown")
        await self._record(old, ev, None, "undefined: forgotten")
        await self._store.delete_guest(old.name)

    async def _process_resync(self, g: GuestEntry, state: tuple[int, int]) -> None:
        g.live = state
        sel = self._t.selection(g)
        self._t.first_sight(g, sel, state[0])
        interrupted = g.st.name in self._recover
        self._recover.discard(g.st.name)
        found = classify_state(*state)
        h = g.st.history
        if found.transition == Transition.STARTED and g.st.migrated_to is not None:
            g.st = g.st.replace(migrated_to=None)  # it runs here: back, by a move no event reported
        step = resync_step(
            found,
            interrupted=interrupted,
            retry_scheduled=g.pending_due is not None,
            boot_flow_pending=found.is_stop and self.boot_flow_pending(),
            next_retry=h.next_retry,
            mode=sel.mode,
            intent=g.st.intent,
            given_up=h.given_up,
        )
        if step == ResyncStep.RECOVER:
            await self._process_recover(g, "action interrupted by a daemon stop")
        elif step == ResyncStep.SCHEDULE and h.next_retry is not None:
            g.pending_due = self._clock.monotonic() + max(0.0, h.next_retry - self._clock.time())
            await self._t.persist(g, g.st.replace(pending_action=g.st.pending_action or "restart"))
        elif step == ResyncStep.DECIDE:
            d = decide(self._t.record(g), found, h, self._clock.time(), sel, self._rand())
            await self._apply(g, d, sel, None)
        elif step == ResyncStep.STABLE:
            await self._t.persist(g, g.st.replace(history=budget.record_stable(h, self._clock.time(), sel.policy)))
        else:
            await self._t.persist(g, g.st)

    async def _process_recover(self, g: GuestEntry, why: str) -> None:
        sel = self._t.selection(g)
        try:
            g.live = await self._t.call("state", self._hv.state(g.st.name))
        except HypervisorError as err:
            self._log.warning("policy_state_failed", guest=g.st.name, code=err.code, error=err.message)
            return
        d = decide_recover(self._t.record(g), g.st.history, self._clock.time(), sel, why)
        await self._apply(g, d, sel, None)

    async def _process_liveness(self, g: GuestEntry, cause: StopCause, detail: str) -> None:
        """A liveness failure: read the guest's state and job (only when the policy would act),
        decide, journal it as a ``liveness`` event and apply the decision."""
        sel = self._t.selection(g)
        busy = None
        if sel.managed and sel.mode == "enforce" and sel.policy.on_probe_failure != "leave":
            try:
                g.live = await self._t.call("state", self._hv.state(g.st.name))
                busy = await self._t.call("job", self._hv.job(g.st.name))
            except HypervisorError as err:
                if err.code != ErrorCode.NO_DOMAIN:
                    self._log.warning("policy_state_failed", guest=g.st.name, code=err.code, error=err.message)
                    return
                g.live = (DomainState.SHUTOFF, 0)
        self._t.first_sight(g, sel, g.live[0] if g.live else DomainState.RUNNING)
        d = decide_liveness(self._t.record(g), cause, detail, g.st.history, self._clock.time(), sel, busy=busy,
                            rand=self._rand())
        ev = Event(time=self._clock.time(), seq=0, source=Source.DOMAIN, kind="liveness", name=g.st.name,
                   uuid=g.st.uuid, event=cause.value.upper(), detail=detail[:200])
        await self._apply(g, d, sel, ev)

    async def _apply(self, g: GuestEntry, d: Decision, sel: Selection, ev: Event | None) -> None:
        """Persist a decision's transition, log it, and (enforce mode) schedule its action."""
        mode = sel.mode
        h = d.history
        pending: str | None = g.st.pending_action
        acting = d.action in (Action.RESTART, Action.RESUME, Action.KILL, Action.RESET)
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
        st = g.st.replace(intent=d.intent, history=h, pending_action=pending,
                          migrated_to=d.migrated_to if d.migrated_to is not None else g.st.migrated_to)
        text = d.message(mode)
        if ev is not None:
            g.st = st
            await self._record(st, ev, d.cause.value if d.cause else None, f"{d.action.value}: {text}")
        else:
            await self._t.persist(g, st)
        level = "info" if (d.action != Action.NONE or mode == "enforce") and mode != "observe" else "debug"
        getattr(self._log, level)(
            "policy_decision",
            guest=g.st.name,
            uuid=g.st.uuid,
            action=d.action.value,
            cause=d.cause.value if d.cause else None,
            mode=mode,
            delay=round(d.delay, 3),
            intent=d.intent,
            key=d.key or None,
            msg=text,
        )
        if mode == "observe":
            return
        if d.alert and mode == "enforce":
            kind = {Action.GIVE_UP: "given_up"}.get(d.action) or (d.cause.value if d.cause else "policy")
            self._t.raise_alert(kind, g, d.alert)
        elif d.cause is not None and mode == "enforce":
            # No alert of the policy's own (a restart, say): the event's alert, if it raised one,
            # still gets the decision as an annotation.
            for listener in self.decision_listeners:
                try:
                    listener(g.st.name, d.cause.value, text)
                except Exception as err:  # a listener must never break the engine
                    self._log.error("policy_decision_listener_failed", guest=g.st.name, error=repr(err))
        if d.action == Action.GIVE_UP and mode == "enforce":
            self._journal.count("give_up", "ok")
        if acting and mode == "enforce":
            self._wake(g)

    # ------------------------------------------------------------------ operator commands, introspection

    async def hold(self, name: str) -> GuestSnapshot:
        """Operator hold (:meth:`~virtwatch.policy.operator.Operator.hold`). Raises KeyError."""
        return await self._ops.hold(name)

    async def release(self, name: str) -> GuestSnapshot:
        """Release a hold (:meth:`~virtwatch.policy.operator.Operator.release`). Raises KeyError."""
        return await self._ops.release(name)

    async def reset(self, name: str) -> GuestSnapshot:
        """Operator reset (:meth:`~virtwatch.policy.operator.Operator.reset`). Raises KeyError."""
        return await self._ops.reset(name)

    async def set_override(self, name: str, values: Mapping[str, Any] | None) -> GuestSnapshot:
        """Replace the runtime policy override (:meth:`~virtwatch.policy.operator.Operator.set_override`).
        Raises KeyError, ValueError."""
        return await self._ops.set_override(name, values)

    def explain(self, name: str) -> Explanation:
        """Merged policy with sources and the decision the engine would take now. Raises KeyError."""
        return self._ops.explain(name)

    def policy_of(self, name: str) -> GuestPolicy:
        """Guest ``name``'s merged policy (override, metadata, rules, profile, defaults); a guest
        never seen gets the rules and defaults alone."""
        g = self._t.guests.get(name)
        if g is None:
            return select(self._settings, name, "", None).policy
        return self._t.selection(g).policy

    def console_capture(self, name: str) -> int | None:
        """Guest ``name``'s ``console_buffer`` (KiB) when its policy captures the console, else None."""
        return self._ops.console_capture(name)

    def snapshot(self) -> EngineSnapshot:
        """Current state for metrics/status (guests that vanished are left out)."""
        return EngineSnapshot(
            self.ready,
            self._t.host_shutdown,
            self._actions.breaker_open,
            MappingProxyType(dict(self._journal.counts)),
            self._ops.guests(),
        )

    # ------------------------------------------------------------------ host shutdown

    def libvirt_guests_status(self) -> Any:
        """:func:`~virtwatch.policy.host.libvirt_guests_active` on the configured paths."""
        return self._save.libvirt_guests_status()

    async def save_guests(self) -> SaveReport:
        """Host-shutdown save path (``virtwatch guests-save``, :class:`~virtwatch.policy.shutdown.SavePath`):
        refused when libvirt-guests owns host shutdown, else each managed running guest's
        ``on_host_shutdown`` steps until one stops it."""
        return await self._save.run()
