"""The policy engine's value types: what it reports, what it queues, and what it keeps per guest.

Plain data, no behaviour beyond rendering: :class:`GuestState` is what is
persisted about a guest; :class:`GuestEntry` is the engine's in-memory row
for it (state plus live context); the snapshots, reports and alerts are what
the engine hands out.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..model import Event
from . import budget
from .budget import History


@dataclasses.dataclass(frozen=True, slots=True)
class GuestState:
    """Everything persisted about one guest.

    Attributes:
        name, uuid: identity (name is the key).
        intent: ``running``, ``stopped`` or ``held``.
        history: restart history (:class:`virtwatch.policy.budget.History`).
        was_running: running when the host-shutdown save path ran.
        boot_pending: boot id whose boot flow still has to handle this guest, or None.
        override: runtime policy override (per-guest keys, ``profile``, ``mode``).
        pending_action: action scheduled at ``history.next_retry`` (``restart``/``resume``), or None.
        migrated_to: set when the guest migrated away from this host (``STOPPED/MIGRATED``): the
            destination's name, or ``""`` when libvirt did not say (libvirt 9.0 never does);
            None while the guest has not left. Cleared when it starts or migrates in here again.
    """

    name: str
    uuid: str = ""
    intent: str = "stopped"
    history: History = History()
    was_running: bool = False
    boot_pending: str | None = None
    override: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    pending_action: str | None = None
    migrated_to: str | None = None

    def replace(self, **changes: Any) -> GuestState:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


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
    migrated_to: str | None = None


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


@dataclasses.dataclass(slots=True)
class WorkItem:
    """One thing for a guest's worker to handle.

    ``kind``: ``event`` (``event`` set), ``resync`` (``state`` = libvirt's ``(state, reason)``),
    ``recover`` (``why`` says why), ``wake`` (re-check the pending action), ``crash_timeout``
    (``event`` = the CRASHED event still waiting for its STOPPED), ``liveness`` (``cause`` = a
    liveness failure's cause, ``why`` = what the detector saw). ``arrived`` is the clock's
    monotonic seconds.
    """

    kind: str                 # "event", "resync", "recover", "wake", "crash_timeout", "liveness"
    event: Event | None
    arrived: float            # monotonic
    state: tuple[int, int] | None = None
    why: str = ""
    cause: str | None = None


@dataclasses.dataclass(slots=True)
class OpTag:
    """One of our operations on a guest (``destroy``, ``start``...), monotonic seconds from
    ``started`` to ``ended`` (None while it runs): events in that window are ours."""

    op: str
    started: float
    ended: float | None = None


@dataclasses.dataclass(slots=True)
class GuestEntry:
    """The engine's row for one guest: its persisted state ``st`` and what is only known live.

    ``queue`` feeds ``worker``; ``live`` is libvirt's last ``(state, reason)``; ``metadata`` the
    domain's policy XML once read (``metadata_known``); ``prev_shutdown``/``watchdog_action``
    the context the next event is classified in; ``ops`` our operations; ``pending_due`` when
    the pending action is due (monotonic); ``gone`` once libvirt no longer lists it;
    ``last_cause`` the cause of the failure being recovered from; ``migrating_in`` True from an
    incoming migration's ``STARTED/MIGRATED`` until it ends (the guest still lives on the source).
    """

    st: GuestState
    queue: asyncio.Queue[WorkItem]
    worker: asyncio.Task[None] | None = None
    live: tuple[int, int] | None = None
    metadata: str | None = None
    metadata_known: bool = False
    prev_shutdown: str | None = None
    watchdog_action: str | None = None
    ops: list[OpTag] = dataclasses.field(default_factory=list)
    pending_due: float | None = None     # monotonic
    gone: bool = False
    last_cause: str | None = None
    crash_deferred: Event | None = None   # a CRASHED event waiting for libvirt's STOPPED/CRASHED
    stop_seen: str | None = None          # boot id when a live STOPPED/CRASHED event last arrived
    migrating_in: bool = False
