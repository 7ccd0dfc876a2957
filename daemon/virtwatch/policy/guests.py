"""The guest table and the action journal: what every part of the policy engine works through.

The engine's parts (intake and worker in ``engine.py``, ``actions.py``,
``boot.py``, ``shutdown.py``, ``operator.py``) never call each other's
methods to reach a guest: they share one :class:`GuestTable` (the guests, how
to select their policy, persist them, call libvirt on them, alert about them)
and one :class:`ActionJournal` (intent before act, for every action). Both
sit below all the parts, so the parts import this module and nothing above it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import structlog

from ..model import DomainState
from .classify import STOPPING_OPS
from .clock import Clock, within
from .config import PolicySettings
from .decide import GuestRecord, initial_intent
from .model import GuestEntry, GuestState, OpTag, PolicyAlert
from .ports import ErrorCode, Hypervisor, HypervisorError
from .select import Selection, select
from .store import ActionRow, AsyncStore

T = TypeVar("T")

#: Poll interval while waiting for a guest to power off or libvirt's guest list to settle, seconds.
POLL_INTERVAL = 1.0


class GuestTable:
    """Every guest the engine knows, by name, and what the engine's parts do with one.

    Args:
        settings: the ``[policy]`` section.
        hypervisor: the libvirt port.
        store: the open :class:`~virtwatch.policy.store.AsyncStore`.
        clock: the engine's clock (deadlines, tags, alert times).
        alert: called with each :class:`~virtwatch.policy.model.PolicyAlert` (must not block).
        logger: a structlog logger.

    Attributes:
        settings, hv, store, clock, log: the above, for the parts that work through the table.
        guests: name -> :class:`~virtwatch.policy.model.GuestEntry` (guests libvirt no longer
            lists stay, ``gone``).
        alerts: the last 1000 alerts raised, oldest first.
        selection_listeners: called with a guest name when its merged policy may have changed.
        host_shutdown: True once the save path has marked the host as shutting down: a stop is
            then never reacted to.
    """

    def __init__(self, settings: PolicySettings, hypervisor: Hypervisor, store: AsyncStore, clock: Clock,
                 alert: Callable[[PolicyAlert], None] | None = None, logger: Any = None) -> None:
        self.settings = settings
        self.hv = hypervisor
        self.store = store
        self.clock = clock
        self.log = logger or structlog.get_logger("virtwatch.policy")
        self._alert_sink = alert
        self.guests: dict[str, GuestEntry] = {}
        self.alerts: collections.deque[PolicyAlert] = collections.deque(maxlen=1000)
        self.selection_listeners: list[Callable[[str], None]] = []
        self.host_shutdown = False

    # -- entries ----------------------------------------------------------------

    def get(self, name: str, uuid: str = "", st: GuestState | None = None) -> GuestEntry:
        """The entry for ``name``, created (with ``st``, else a state never persisted, intent
        ``unknown``) if new; a non-empty ``uuid`` that differs replaces the known one."""
        g = self.guests.get(name)
        if g is None:
            g = GuestEntry(st or GuestState(name=name, uuid=uuid, intent="unknown"), asyncio.Queue())
            self.guests[name] = g
        if uuid and g.st.uuid != uuid:
            g.st = g.st.replace(uuid=uuid)
        return g

    def known(self, name: str) -> GuestEntry:
        """The entry for ``name``. Raises KeyError for a guest never seen nor persisted
        (every persisted guest is loaded at start)."""
        g = self.guests.get(name)
        if g is None:
            raise KeyError(name)
        return g

    def load(self, states: Mapping[str, GuestState]) -> list[GuestEntry]:
        """Enter the persisted ``states`` (name -> state), at start; returns their entries. A guest
        already entered (an event came first) takes its persisted state."""
        out = []
        for name, st in states.items():
            g = self.guests.get(name)
            if g is None:
                g = self.get(name, st.uuid, st)
            else:
                g.st = st.replace(uuid=g.st.uuid or st.uuid)
            out.append(g)
        return out

    # -- policy -----------------------------------------------------------------

    def selection(self, g: GuestEntry) -> Selection:
        """The guest's merged policy (override, metadata, rules, profile, defaults) and mode."""
        return select(self.settings, g.st.name, g.st.uuid, g.metadata, g.st.override)

    def record(self, g: GuestEntry) -> GuestRecord:
        """What :func:`~virtwatch.policy.decide.decide` needs to know about the guest now."""
        state, reason = g.live if g.live else (DomainState.NOSTATE, 0)
        return GuestRecord(g.st.name, g.st.uuid, state, reason, g.st.intent)  # type: ignore[arg-type]

    def first_sight(self, g: GuestEntry, sel: Selection, state: int) -> None:
        """Give a guest seen for the first time (intent ``unknown``) its intent, from policy and ``state``."""
        if g.st.intent == "unknown":
            g.st = g.st.replace(intent=initial_intent(sel.policy, state))

    async def refresh_metadata(self, g: GuestEntry) -> None:
        """Read the guest's policy metadata from libvirt unless known; failures are logged."""
        if g.metadata_known:
            return
        try:
            before = g.metadata
            g.metadata = await self.call("metadata", self.hv.metadata(g.st.name))
            g.metadata_known = True
            if g.metadata != before:
                self.selection_changed(g.st.name)
        except HypervisorError as err:
            if err.code == ErrorCode.NO_DOMAIN:
                g.metadata, g.metadata_known = None, True
            else:
                self.log.warning("policy_metadata_failed", guest=g.st.name, code=err.code, error=err.message)

    def selection_changed(self, name: str) -> None:
        """Tell the :attr:`selection_listeners` that ``name``'s merged policy may have changed."""
        for listener in list(self.selection_listeners):
            try:
                listener(name)
            except Exception as err:  # a listener must never break the engine
                self.log.error("policy_selection_listener_failed", error=repr(err))

    # -- persistence --------------------------------------------------------------

    async def persist(self, g: GuestEntry, st: GuestState) -> None:
        """Make ``st`` the guest's state and commit it (one transaction)."""
        g.st = st  # memory first: the store commits in the order of the calls
        await self.store.save_guest(st)

    # -- libvirt ----------------------------------------------------------------

    async def call(self, what: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a hypervisor call under the engine's own deadline (``timeout`` seconds of the
        clock, default ``action_timeout``; on top of the port's). Raises HypervisorError
        (``OPERATION_TIMEOUT`` at the deadline)."""
        try:
            return await within(self.clock, timeout or self.settings.action_timeout, aw)
        except TimeoutError:
            raise HypervisorError(ErrorCode.OPERATION_TIMEOUT, f"{what}: no answer within deadline") from None

    async def tagged(self, g: GuestEntry, op: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """:meth:`call` as our operation ``op`` on the guest: events while it runs (and
        ``own_event_grace`` after) are ours (:meth:`is_ours`)."""
        tag = OpTag(op, self.clock.monotonic())
        g.ops.append(tag)
        try:
            return await self.call(op, aw, timeout)
        finally:
            tag.ended = self.clock.monotonic()

    def is_ours(self, g: GuestEntry, arrived: float) -> str | None:
        """Our operation an event that ``arrived`` (monotonic) belongs to, or None."""
        grace = self.settings.own_event_grace
        now = self.clock.monotonic()
        g.ops = [o for o in g.ops if o.ended is None or now - o.ended <= grace]
        hits = [o.op for o in g.ops if o.started <= arrived and (o.ended is None or arrived <= o.ended + grace)]
        # a stop that follows our kill and our restart within the grace is the kill's: prefer stopping ops
        return next((op for op in hits if op in STOPPING_OPS), hits[0] if hits else None)

    # -- alerts -----------------------------------------------------------------

    def raise_alert(self, kind: str, g: GuestEntry, message: str) -> None:
        """Record, log and hand on one :class:`~virtwatch.policy.model.PolicyAlert` of ``kind``."""
        a = PolicyAlert(kind, g.st.name, g.st.uuid, message, self.clock.time())
        self.alerts.append(a)
        self.log.warning("policy_alert", alert=kind, guest=g.st.name, uuid=g.st.uuid, msg=message)
        if self._alert_sink is not None:
            try:
                self._alert_sink(a)
            except Exception as err:  # an alert sink must never break the engine
                self.log.error("policy_alert_sink_failed", error=repr(err))


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How an action ended.

    ``result``: ``ok``, ``failed``, ``restored``, ``already_running``... (journal and counter);
    ``detail``: the journal's text ("" if none); ``error``: what made it fail, else None.
    """

    result: str
    detail: str = ""
    error: HypervisorError | None = None


#: An action that raised nothing.
OK = Outcome("ok")


def failed(err: HypervisorError) -> Outcome:
    """The default reading of an error: ``failed``, detail ``[code] message``."""
    return Outcome("failed", f"[{err.code}] {err.message}", err)


class ActionJournal:
    """Intent before act, for every action virtwatch runs on a guest, and the action counters.

    Attributes:
        counts: ``(action, result) -> n`` since the daemon started (``virtwatch_policy_actions_total``;
            a reload hands them over, as ``counts``).
    """

    def __init__(self, store: AsyncStore, logger: Any = None,
                 counts: Mapping[tuple[str, str], int] | None = None) -> None:
        self._store = store
        self._log = logger or structlog.get_logger("virtwatch.policy")
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter(counts or {})

    def count(self, action: str, result: str) -> None:
        """Count an outcome that has no journal row of its own (a give-up, a deferral...)."""
        self.counts[(action, result)] += 1

    async def run(self, g: GuestEntry, action: str, reason: str, act: Callable[[], Awaitable[Outcome | None]],
                  *, on_error: Callable[[HypervisorError], Outcome] = failed, count_as: str | None = None) -> Outcome:
        """Run ``act`` on guest ``g`` as journalled action ``action`` (``reason``: why).

        Commits ``g.st`` (set it first: counters already bumped) with an open row for the
        action, then awaits ``act()``: what it returns (None: :data:`OK`), or
        ``on_error(err)`` for a HypervisorError it raises, is the outcome. The outcome is
        counted as ``(count_as or action, result)`` and committed with ``g.st`` as it is
        then. A daemon that dies in between leaves the row open: at the next start
        :meth:`close_interrupted` closes it and the guest's real state is checked
        instead of the action being repeated. Returns the outcome; other exceptions
        propagate and leave the row open.
        """
        action_id = await self._store.begin_action(g.st, action, reason)
        try:
            out = await act() or OK
        except HypervisorError as err:
            out = on_error(err)
        self.count(count_as or action, out.result)
        await self._store.finish_action(action_id, out.result, out.detail, g.st)
        return out

    def log_action(self, g: GuestEntry, action: str, out: Outcome) -> None:
        """The ``policy_action`` line for one outcome."""
        self._log.info("policy_action", guest=g.st.name, uuid=g.st.uuid, action=action, result=out.result,
                       detail=out.detail)

    async def close_interrupted(self, rows: Iterable[ActionRow]) -> None:
        """Close the actions a stopped daemon left open (``interrupted``), counted."""
        for row in rows:
            self.count(row.action, "interrupted")
            await self._store.finish_action(row.id, "interrupted", "daemon stopped while the action ran")
