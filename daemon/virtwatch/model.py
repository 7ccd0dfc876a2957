"""The event vocabulary: one home for what every part of virtwatch says about guests.

* :class:`Event`, the normalised record every libvirt event becomes, one type for every
  domain, network, storage-pool, node-device and secret event, so that subscribers (guest
  state, metrics, logs, policy, alerts, journal) never deal with libvirt's 30 callback
  signatures;
* :class:`Source`, :class:`Kind` and :class:`Lifecycle`: the names events carry. They are
  ``StrEnum`` s, so a member equals its string (``Lifecycle.STOPPED == "STOPPED"``) and JSON,
  logs and metric labels keep the plain names;
* :class:`DomainState` and the reason enums: libvirt's ``virDomainState`` and
  ``virDomain*Reason`` integers, mirrored so that pure code never imports libvirt;
* :data:`ACTIVE` and :data:`RUNNING`: the two meanings of "the guest is up";
* predicates on events (:func:`is_crash`, :func:`is_guest_failure`) and
  :func:`lifecycle_state`, the state a lifecycle event leaves a guest in;
* :class:`ResyncEntry`, one guest as a resync reads it.

Nothing here imports libvirt or any other part of virtwatch.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class Source(enum.StrEnum):
    """The object an event is about (``Event.source``)."""

    DOMAIN = "domain"
    NETWORK = "network"
    STORAGE_POOL = "storage_pool"
    NODE_DEVICE = "node_device"
    SECRET = "secret"


class Kind(enum.StrEnum):
    """The event IDs virtwatch decides on (``Event.kind``: libvirt's event ID in lower case
    without prefix; :data:`virtwatch.virt.decode.DOMAIN_EVENTS` lists every one it receives)."""

    LIFECYCLE = "lifecycle"
    WATCHDOG = "watchdog"
    IO_ERROR = "io_error"
    AGENT_LIFECYCLE = "agent_lifecycle"
    METADATA_CHANGE = "metadata_change"
    REBOOT = "reboot"


class Lifecycle(enum.StrEnum):
    """``virDomainEventType``: the ``event`` of a lifecycle event."""

    DEFINED = "DEFINED"
    UNDEFINED = "UNDEFINED"
    STARTED = "STARTED"
    SUSPENDED = "SUSPENDED"
    RESUMED = "RESUMED"
    STOPPED = "STOPPED"
    SHUTDOWN = "SHUTDOWN"
    PMSUSPENDED = "PMSUSPENDED"
    CRASHED = "CRASHED"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One libvirt event, decoded.

    Attributes:
        time: wall-clock time the callback ran, seconds since the epoch.
        seq: per-process sequence number, strictly increasing in arrival order.
        source: the object type, a :class:`Source` value.
        kind: the event ID in lower case without prefix, e.g. ``lifecycle``,
            ``io_error``, ``watchdog``, ``agent_lifecycle``, ``reboot`` (see :class:`Kind`).
        name: the object's name (for domain events, the guest name).
        uuid: the object's UUID string ("" for node devices, which have none).
        event: decoded event name, upper case as in libvirt's constants:
            lifecycle ``STOPPED`` (a :class:`Lifecycle` value); watchdog ``WATCHDOG``;
            I/O error ``IO_ERROR``...
        detail: decoded detail: lifecycle ``CRASHED``; watchdog action
            ``PAUSE``; I/O error reason ``enospc``; "" when the event has none.
        payload: event-specific values (JSON-serialisable), e.g. I/O error
            ``{"src": path, "dev": alias, "action": "PAUSE"}``.
        raw: the integer codes libvirt delivered, for lifecycle ``(event, detail)``.
    """

    time: float
    seq: int
    source: str
    kind: str
    name: str
    uuid: str
    event: str
    detail: str
    payload: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    raw: tuple[int, ...] = ()

    @property
    def domain(self) -> str | None:
        """The guest name for domain events, else ``None``."""
        return self.name if self.source == Source.DOMAIN else None

    def is_lifecycle(self, *events: Lifecycle) -> bool:
        """True for a domain lifecycle event whose ``event`` is one of ``events`` (any, if none)."""
        return (self.source == Source.DOMAIN and self.kind == Kind.LIFECYCLE
                and (not events or self.event in events))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (payload copied)."""
        return {
            "time": self.time,
            "seq": self.seq,
            "source": self.source,
            "kind": self.kind,
            "name": self.name,
            "uuid": self.uuid,
            "event": self.event,
            "detail": self.detail,
            "payload": dict(self.payload),
            "raw": list(self.raw),
        }


# -- domain state ---------------------------------------------------------------------

class DomainState(enum.IntEnum):
    """``virDomainState``."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


class RunningReason(enum.IntEnum):
    """``virDomainRunningReason``."""

    UNKNOWN = 0
    BOOTED = 1
    MIGRATED = 2
    RESTORED = 3
    FROM_SNAPSHOT = 4
    UNPAUSED = 5
    MIGRATION_CANCELED = 6
    SAVE_CANCELED = 7
    WAKEUP = 8
    CRASHED = 9
    POSTCOPY = 10
    POSTCOPY_FAILED = 11


class ShutoffReason(enum.IntEnum):
    """``virDomainShutoffReason``."""

    UNKNOWN = 0
    SHUTDOWN = 1
    DESTROYED = 2
    CRASHED = 3
    MIGRATED = 4
    SAVED = 5
    FAILED = 6
    FROM_SNAPSHOT = 7
    DAEMON = 8


class PausedReason(enum.IntEnum):
    """``virDomainPausedReason``."""

    UNKNOWN = 0
    USER = 1
    MIGRATION = 2
    SAVE = 3
    DUMP = 4
    IOERROR = 5
    WATCHDOG = 6
    FROM_SNAPSHOT = 7
    SHUTTING_DOWN = 8
    SNAPSHOT = 9
    CRASHED = 10
    STARTING_UP = 11
    POSTCOPY = 12
    POSTCOPY_FAILED = 13
    API_ERROR = 14


class CrashedReason(enum.IntEnum):
    """``virDomainCrashedReason``."""

    UNKNOWN = 0
    PANICKED = 1


class PMSuspendedReason(enum.IntEnum):
    """``virDomainPMSuspendedReason``."""

    UNKNOWN = 0


#: QEMU exists for the guest: a console can be read, the guest counts as active (libvirt's
#: ``virDomainIsActive``). A crashed guest kept for inspection (``on_crash = preserve``) is here.
ACTIVE: frozenset[int] = frozenset({DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED,
                                    DomainState.SHUTDOWN, DomainState.CRASHED, DomainState.PMSUSPENDED})

#: The guest's vCPUs execute (``BLOCKED`` is a running guest waiting on a resource): only then can
#: its agent answer. A paused guest is active but not running.
RUNNING: frozenset[int] = frozenset({DomainState.RUNNING, DomainState.BLOCKED})


#: lifecycle event → the state it leaves the guest in, and that state's reason enum
#: (None: the event does not change the state).
_EVENT_STATE: Mapping[str, tuple[DomainState, type[enum.IntEnum]] | None] = {
    Lifecycle.DEFINED: None,
    Lifecycle.UNDEFINED: None,
    Lifecycle.STARTED: (DomainState.RUNNING, RunningReason),
    Lifecycle.SUSPENDED: (DomainState.PAUSED, PausedReason),
    Lifecycle.RESUMED: (DomainState.RUNNING, RunningReason),
    Lifecycle.STOPPED: (DomainState.SHUTOFF, ShutoffReason),
    Lifecycle.SHUTDOWN: None,
    Lifecycle.PMSUSPENDED: (DomainState.PMSUSPENDED, PMSuspendedReason),
    Lifecycle.CRASHED: (DomainState.CRASHED, CrashedReason),
}

#: lifecycle detail names that differ from the state-reason names.
_REASON_ALIASES: Mapping[tuple[str, str], str] = {
    (Lifecycle.SUSPENDED, "PAUSED"): "USER",
    (Lifecycle.SUSPENDED, "MIGRATED"): "MIGRATION",
    (Lifecycle.SUSPENDED, "RESTORED"): "FROM_SNAPSHOT",
    (Lifecycle.SUSPENDED, "POSTCOPY"): "POSTCOPY",
    (Lifecycle.PMSUSPENDED, "MEMORY"): "UNKNOWN",
    (Lifecycle.PMSUSPENDED, "DISK"): "UNKNOWN",
}


def lifecycle_state(event: str, detail: str) -> tuple[int, int] | None:
    """(virDomainState, reason code) a lifecycle event leaves the guest in.

    ``("STOPPED", "CRASHED")`` → ``(SHUTOFF, ShutoffReason.CRASHED)``. Returns None for
    events that do not change the state (DEFINED, SHUTDOWN…). The reason is 0 (unknown)
    when the detail names no reason of that state.
    """
    entry = _EVENT_STATE.get(event)
    if entry is None:
        return None
    state, reasons = entry
    name = _REASON_ALIASES.get((event, detail), detail)
    member = reasons.__members__.get(name)
    return int(state), int(member) if member is not None else 0


#: state → the lifecycle event that leaves a guest in it (see :func:`missed_lifecycle`).
_STATE_EVENT: Mapping[int, tuple[Lifecycle, type[enum.IntEnum]]] = {
    DomainState.RUNNING: (Lifecycle.STARTED, RunningReason),
    DomainState.BLOCKED: (Lifecycle.STARTED, RunningReason),
    DomainState.PAUSED: (Lifecycle.SUSPENDED, PausedReason),
    DomainState.SHUTOFF: (Lifecycle.STOPPED, ShutoffReason),
    DomainState.CRASHED: (Lifecycle.CRASHED, CrashedReason),
    DomainState.PMSUSPENDED: (Lifecycle.PMSUSPENDED, PMSuspendedReason),
}


def missed_lifecycle(state: int, reason: int) -> tuple[str, str] | None:
    """The lifecycle ``(event, detail)`` that would have left a guest in ``(state, reason)``:
    what a resync stands in for when it finds a state no event reported (the connection was
    down). ``(SHUTOFF, ShutoffReason.CRASHED)`` → ``("STOPPED", "CRASHED")``; a running guest
    whose reason is ``UNPAUSED`` → ``("RESUMED", "UNPAUSED")``. None for states no event
    leads to (``NOSTATE``, ``SHUTDOWN``) and for unknown codes. The inverse of
    :func:`lifecycle_state` where libvirt names detail and reason alike."""
    entry = _STATE_EVENT.get(state)
    if entry is None:
        return None
    event, reasons = entry
    try:
        name = reasons(reason).name
    except ValueError:
        name = "UNKNOWN"
    if event == Lifecycle.STARTED and name == "UNPAUSED":
        return Lifecycle.RESUMED, name
    detail = next((d for (e, d), r in _REASON_ALIASES.items() if e == event and r == name), name)
    return event, detail


def is_crash(ev: Event) -> bool:
    """The guest died: lifecycle ``CRASHED`` (any detail), ``STOPPED/CRASHED`` (guest panic
    with ``on_crash = destroy``) or ``STOPPED/FAILED`` (QEMU itself died)."""
    return ev.is_lifecycle(Lifecycle.CRASHED) or (
        ev.is_lifecycle(Lifecycle.STOPPED) and ev.detail in ("CRASHED", "FAILED"))


def is_guest_failure(kind: str, event: str, detail: str) -> bool:
    """True for events only the guest (or QEMU) causes, never an operation: a panic, QEMU's
    death, a pause for an I/O error or a watchdog, an I/O error or watchdog event."""
    if kind in (Kind.IO_ERROR, Kind.WATCHDOG):
        return True
    if kind != Kind.LIFECYCLE:
        return False
    return (event == Lifecycle.CRASHED or (event == Lifecycle.STOPPED and detail in ("CRASHED", "FAILED"))
            or (event == Lifecycle.SUSPENDED and detail in ("IOERROR", "WATCHDOG")))


@dataclasses.dataclass(frozen=True, slots=True)
class ResyncEntry:
    """One guest as read by a resync (``getAllDomainStats(STATE)`` + ``listAllDomains`` flags).

    ``state``/``reason``: ``state.state`` and ``state.reason``; ``persistent``/``autostart``:
    None when unknown.
    """

    name: str
    uuid: str
    state: int
    reason: int
    persistent: bool | None
    autostart: bool | None
