"""The normalised event record every libvirt event becomes.

One :class:`Event` type for every domain, network, storage-pool, node-device
and secret event, so that subscribers (guest state, metrics, logs, policy,
alerts, journal) never deal with libvirt's 30 callback signatures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One libvirt event, decoded.

    Attributes:
        time: wall-clock time the callback ran, seconds since the epoch.
        seq: per-process sequence number, strictly increasing in arrival order.
        source: the object type: ``domain``, ``network``, ``storage_pool``,
            ``node_device`` or ``secret``.
        kind: the event ID in lower case without prefix, e.g. ``lifecycle``,
            ``io_error``, ``watchdog``, ``agent_lifecycle``, ``reboot``.
        name: the object's name (for domain events, the guest name).
        uuid: the object's UUID string ("" for node devices, which have none).
        event: decoded event name, upper case as in libvirt's constants:
            lifecycle ``STOPPED``; watchdog ``WATCHDOG``; I/O error ``IO_ERROR``...
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
        return self.name if self.source == "domain" else None

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
