"""Host inventory from events: networks and storage pools, reflected at once.

The stats poll reads networks (``listAllNetworks``) and storage pools
(``virStoragePoolGetInfo``) every ``stats.poll_interval``; between polls a
pool that stops or a network that is destroyed would still show its old
state. :class:`Inventory` is a pump subscriber that records network and
storage-pool lifecycle events as *overrides* and :meth:`Inventory.overlay`
applies them to a poll :class:`~virtwatch.virt.stats.Snapshot`:

* network ``STARTED`` → active, ``STOPPED`` → inactive, ``DEFINED`` → listed
  (inactive unless known), ``UNDEFINED`` → removed;
* pool ``STARTED`` → state 2 (running), ``STOPPED`` → 0 (inactive),
  ``DEFINED`` → listed inactive, ``UNDEFINED`` → removed (``CREATED`` /
  ``DELETED`` — build/delete of the pool's storage — change no state). Pool
  sizes are only exported from a poll that saw the pool active (an event
  carries no sizes, and a made-up 0 would be wrong), so a pool started by
  event shows its state at once and its sizes from the next poll.

An override is kept while a snapshot might predate it: it is dropped once a
poll *started* after the event (``snapshot.time - snapshot.duration`` ≥ event
time), from then on the poll is authoritative. Node-device and secret events
are counted by the daemon (``libvirt_events_total``) and tracked here in
:attr:`Inventory.counts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import libvirt

from .model import Event, Lifecycle, Source
from .virt.stats import NetworkInfo, PoolInfo, Snapshot

_POOL_RUNNING = libvirt.VIR_STORAGE_POOL_RUNNING
_POOL_INACTIVE = libvirt.VIR_STORAGE_POOL_INACTIVE


@dataclasses.dataclass(frozen=True, slots=True)
class Override:
    """One object's event-derived state: ``present`` False = undefined;
    ``active`` for networks and pools; ``time`` of the event (wall seconds)."""

    name: str
    uuid: str
    present: bool
    active: bool
    time: float


class Inventory:
    """Event overlay for networks and storage pools (pump subscriber, loop thread only).

    :attr:`version` changes with every override change; :attr:`counts` maps
    ``(source, event)`` to the number of events seen.
    """

    def __init__(self) -> None:
        self._networks: dict[str, Override] = {}
        self._pools: dict[str, Override] = {}
        self.version = 0
        self.counts: dict[tuple[str, str], int] = {}
        self._view_key: tuple[int, int] | None = None
        self._view: Snapshot | None = None
        self._view_seq = 0

    def on_event(self, ev: Event) -> None:
        """Record a network / storage-pool lifecycle event; count every host event."""
        if ev.source == Source.DOMAIN:
            return
        self.counts[(ev.source, ev.event)] = self.counts.get((ev.source, ev.event), 0) + 1
        table = {"network": self._networks, "storage_pool": self._pools}.get(ev.source)
        if table is None:
            return
        prev = table.get(ev.name)
        if ev.event == Lifecycle.STARTED:
            ov = Override(ev.name, ev.uuid, True, True, ev.time)
        elif ev.event == Lifecycle.STOPPED:
            ov = Override(ev.name, ev.uuid, True, False, ev.time)
        elif ev.event == Lifecycle.DEFINED:
            ov = Override(ev.name, ev.uuid, True, prev.active if prev is not None and prev.present else False,
                          ev.time)
        elif ev.event == Lifecycle.UNDEFINED:
            ov = Override(ev.name, ev.uuid, False, False, ev.time)
        else:
            return
        table[ev.name] = ov
        self.version += 1

    def overrides(self) -> dict[str, dict[str, Override]]:
        """Current overrides: ``{"network": {...}, "storage_pool": {...}}``."""
        return {"network": dict(self._networks), "storage_pool": dict(self._pools)}

    def overlay(self, snap: Snapshot | None) -> Snapshot | None:
        """``snap`` with the event overrides applied to its host inventory.

        Overrides older than the poll's start are dropped first. The result's
        ``seq`` is a view counter that changes whenever the poll or the
        overrides change (the metrics cache keys on it). A snapshot without
        host figures (``stats.host = false``) is returned unchanged.
        """
        if snap is None or snap.host is None:
            return snap
        started = snap.time - snap.duration
        for table in (self._networks, self._pools):
            for name in [n for n, o in table.items() if o.time < started]:
                del table[name]
                self.version += 1
        key = (snap.seq, self.version)
        if key == self._view_key and self._view is not None:
            return self._view
        self._view_seq += 1
        host = snap.host
        if self._networks or self._pools:
            host = dataclasses.replace(host, networks=_apply_networks(host.networks, self._networks),
                                       pools=_apply_pools(host.pools, self._pools))
        self._view = dataclasses.replace(snap, seq=self._view_seq, host=host)
        self._view_key = key
        return self._view

    def view(self, latest: Callable[[], Snapshot | None]) -> Callable[[], Snapshot | None]:
        """A snapshot getter that overlays ``latest()`` (for the metrics collector)."""
        return lambda: self.overlay(latest())


def _apply_networks(nets: tuple[NetworkInfo, ...], ovs: dict[str, Override]) -> tuple[NetworkInfo, ...]:
    out = []
    for n in nets:
        ov = ovs.get(n.name)
        if ov is None:
            out.append(n)
        elif ov.present:
            out.append(dataclasses.replace(n, active=ov.active))
    known = {n.name for n in nets}
    out.extend(NetworkInfo(name=o.name, uuid=o.uuid, active=o.active)
               for o in ovs.values() if o.present and o.name not in known)
    return tuple(sorted(out, key=lambda n: n.name))


def _apply_pools(pools: tuple[PoolInfo, ...], ovs: dict[str, Override]) -> tuple[PoolInfo, ...]:
    out = []
    for p in pools:
        ov = ovs.get(p.name)
        if ov is None:
            out.append(p)
        elif ov.present:
            if ov.active == p.active:
                out.append(p)
            else:
                # Sizes only from a poll that saw the pool active: never a made-up 0.
                out.append(dataclasses.replace(p, active=ov.active and p.active,
                                               state=_POOL_RUNNING if ov.active else _POOL_INACTIVE))
    known = {p.name for p in pools}
    out.extend(PoolInfo(name=o.name, uuid=o.uuid, state=_POOL_RUNNING if o.active else _POOL_INACTIVE,
                        capacity=0, allocation=0, available=0, active=False)
               for o in ovs.values() if o.present and o.name not in known)
    return tuple(sorted(out, key=lambda p: p.name))
