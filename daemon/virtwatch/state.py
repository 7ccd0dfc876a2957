"""Guest state: the single source of truth, built from events and resyncs.

Only the event pump (through :meth:`GuestRegistry.on_event`) and the
connection's resync (:meth:`GuestRegistry.apply_resync`, on the loop thread)
write it. Everything else reads :meth:`GuestRegistry.guests` — immutable
:class:`GuestView` records.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import libvirt

from .model import Event, Kind, Lifecycle, ResyncEntry, Source, lifecycle_state


@dataclasses.dataclass(frozen=True, slots=True)
class GuestView:
    """One guest as the daemon currently knows it.

    Attributes:
        name, uuid: identity (uuid is the stable key; names can be reused).
        state, reason: virDomainState and its reason code (``virDomainGetState``).
        persistent, autostart: from ``listAllDomains`` flags at the last resync;
            None if unknown.
        last_event, last_detail, last_event_time: the latest lifecycle event.
        agent_connected: from AGENT_LIFECYCLE events; None if never seen.
    """

    name: str
    uuid: str
    state: int
    reason: int
    persistent: bool | None = None
    autostart: bool | None = None
    last_event: str = ""
    last_detail: str = ""
    last_event_time: float | None = None
    agent_connected: bool | None = None


class GuestLookup(Protocol):
    """The read side of :class:`GuestRegistry` that features (agent, console capture) use."""

    #: Increases with every change of the table.
    version: int

    def guests(self) -> list[GuestView]:
        """Every known guest (``name``, ``uuid``, ``state``, ``agent_connected``...)."""

    def by_name(self, name: str) -> GuestView | None:
        """One guest, or None."""


class GuestRegistry:
    """Per-guest state keyed by UUID.

    Args:
        clock: wall clock, seconds (injected for tests).

    :attr:`version` increases with every change, so readers can cache work
    derived from the state (the metrics collector does).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._guests: dict[str, GuestView] = {}
        self._last_seq: dict[str, int] = {}
        self.version = 0
        self.resynced_at: float | None = None

    def guests(self) -> list[GuestView]:
        """All known guests, sorted by name."""
        return sorted(self._guests.values(), key=lambda g: g.name)

    def get(self, uuid: str) -> GuestView | None:
        """The guest with ``uuid``, if known."""
        return self._guests.get(uuid)

    def by_name(self, name: str) -> GuestView | None:
        """The guest named ``name``, if known (names are unique per host)."""
        for g in self._guests.values():
            if g.name == name:
                return g
        return None

    def on_event(self, ev: Event) -> None:
        """Apply one event (pump subscriber). Non-domain events are ignored."""
        if ev.source != Source.DOMAIN or not ev.uuid:
            return
        current = self._guests.get(ev.uuid)
        self._last_seq[ev.uuid] = ev.seq
        if ev.kind == Kind.AGENT_LIFECYCLE:
            if current is not None:
                self._put(dataclasses.replace(current, agent_connected=(ev.event == "CONNECTED")))
            return
        if ev.kind != Kind.LIFECYCLE:
            return
        if current is None:
            # A guest first seen by an event other than DEFINED was created transient (createXML).
            current = GuestView(name=ev.name, uuid=ev.uuid, state=libvirt.VIR_DOMAIN_SHUTOFF, reason=0,
                                persistent=ev.event == Lifecycle.DEFINED)
        if ev.event == Lifecycle.UNDEFINED and current.state == libvirt.VIR_DOMAIN_SHUTOFF:
            self._guests.pop(ev.uuid, None)
            self.version += 1
            return
        updated = dataclasses.replace(current, name=ev.name, last_event=ev.event, last_detail=ev.detail,
                                      last_event_time=ev.time)
        if ev.event == Lifecycle.UNDEFINED:
            updated = dataclasses.replace(updated, persistent=False, autostart=False)
        elif ev.event == Lifecycle.DEFINED:
            updated = dataclasses.replace(updated, persistent=True)
        new_state = lifecycle_state(ev.event, ev.detail)
        if new_state is not None:
            updated = dataclasses.replace(updated, state=new_state[0], reason=new_state[1])
            if ev.event == Lifecycle.STARTED:
                updated = dataclasses.replace(updated, agent_connected=None)
        if (ev.event == Lifecycle.STOPPED and updated.persistent is False):
            self._guests.pop(ev.uuid, None)  # a transient guest is gone once stopped
            self.version += 1
            return
        self._put(updated)

    def apply_resync(self, entries: Iterable[ResyncEntry], started_after_seq: int) -> list[tuple[GuestView, GuestView]]:
        """Replace the state with a fresh read, keeping newer event-derived state.

        Args:
            entries: every guest libvirt listed.
            started_after_seq: the event sequence number delivered before the
                read began; guests with a later event keep their event-derived
                state (the read may predate that event).

        Returns:
            ``(before, after)`` for each known guest whose state or reason the read changed:
            changes no event reported (they happened while the connection was down).
        """
        fresh: dict[str, GuestView] = {}
        changed: list[tuple[GuestView, GuestView]] = []
        for e in entries:
            old = self._guests.get(e.uuid)
            if old is not None and self._last_seq.get(e.uuid, 0) > started_after_seq:
                fresh[e.uuid] = dataclasses.replace(old, persistent=e.persistent, autostart=e.autostart)
                continue
            base = old or GuestView(name=e.name, uuid=e.uuid, state=e.state, reason=e.reason)
            fresh[e.uuid] = dataclasses.replace(base, name=e.name, state=e.state, reason=e.reason,
                                                persistent=e.persistent, autostart=e.autostart)
            if old is not None and (old.state, old.reason) != (e.state, e.reason):
                changed.append((old, fresh[e.uuid]))
        for uuid, old in self._guests.items():
            if uuid not in fresh and self._last_seq.get(uuid, 0) > started_after_seq:
                fresh[uuid] = old  # appeared by event after the read began
        self._guests = fresh
        self._last_seq = {u: s for u, s in self._last_seq.items() if u in fresh}
        self.resynced_at = self._clock()
        self.version += 1
        return changed

    def _put(self, view: GuestView) -> None:
        self._guests[view.uuid] = view
        self.version += 1


def count_by_state(guests: Iterable[GuestView]) -> dict[int, int]:
    """``{virDomainState: number of guests}``."""
    out: dict[int, int] = {}
    for g in guests:
        out[g.state] = out.get(g.state, 0) + 1
    return out
