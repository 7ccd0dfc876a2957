"""Live migrations as this host sees them: which guests are moving, which way, how far along,
and how many moves ended well or badly. Pure: events and job statistics in, state out.

What libvirt 9.0 / QEMU 7.2 deliver (recorded with two libvirtds on one machine,
tests/e2e/test_migration.py):

- **source**, success: ``MIGRATION_ITERATION`` 1, 2, … (one per pre-copy pass),
  ``SUSPENDED/MIGRATED`` (the last pass, guest paused), ``STOPPED/MIGRATED``, then
  ``JOB_COMPLETED`` (``operation`` 5 = migration out, with the final figures);
- **destination**, success: ``STARTED/MIGRATED`` (the incoming copy, paused) when the
  migration begins, ``RESUMED/MIGRATED`` when it is done;
- **aborted or refused** (``virsh domjobabort``, a destination that fails): the destination's
  copy ends with ``STOPPED/FAILED``; the *source gets no lifecycle event at all*, its guest
  just keeps running. Only its job tells: ``virDomainGetJobStats`` type ``NONE`` once the
  job is over. So the statistics poller reads ``jobStats`` of every guest migrating out
  (:meth:`MigrationTracker.outgoing`) and reports it here (:meth:`MigrationTracker.on_job`);
  a guest that is still running with no job has a failed migration out. A source whose
  last pass failed gets ``RESUMED/MIGRATED``, which ends it as failed too.

libvirt does not say where a guest went (no event names the destination).

Only the event pump and the poller's job readings (both on the loop) write the tracker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..model import Event, Kind, Lifecycle, Source

Direction = Literal["in", "out"]

#: ``virDomainJobOperation`` values of ``JOB_COMPLETED``'s ``operation`` field.
JOB_OPERATION_MIGRATION_IN = 4
JOB_OPERATION_MIGRATION_OUT = 5

#: ``virDomainJobType`` NONE: no job is running.
JOB_NONE = 0

#: ``result`` label values of ``libvirt_domain_migrations_total``.
OK, FAILED = "ok", "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationPhase:
    """One guest's migration in progress on this host.

    Attributes:
        name, uuid: the guest.
        direction: ``in`` (this host receives it) or ``out`` (it leaves this host).
        started: wall-clock seconds of the first sign of it (event time).
        last_progress: wall-clock seconds of the last sign that it advanced: an event of it,
            a higher iteration or less data remaining in ``jobStats``.
        iteration: pre-copy pass (``MIGRATION_ITERATION``, ``memory_iteration``), None until known.
        data_remaining_bytes, data_total_bytes, data_processed_bytes: ``data_remaining``,
            ``data_total``, ``data_processed`` of ``jobStats`` (source only), None until read.
        dirty_rate_bytes_per_second: ``memory_dirty_rate`` (pages/s) × ``memory_page_size``.
        elapsed_seconds: ``time_elapsed`` (ms) / 1000.
    """

    name: str
    uuid: str
    direction: Direction
    started: float
    last_progress: float
    iteration: int | None = None
    data_remaining_bytes: int | None = None
    data_total_bytes: int | None = None
    data_processed_bytes: int | None = None
    dirty_rate_bytes_per_second: float | None = None
    elapsed_seconds: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """A migration that ended on this host: ``result`` is ``ok`` or ``failed``; ``why`` one line."""

    name: str
    uuid: str
    direction: Direction
    result: str
    why: str
    time: float


def _int(stats: Mapping[str, Any], key: str) -> int | None:
    v = stats.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def apply_job_stats(phase: MigrationPhase, stats: Mapping[str, Any], now: float) -> MigrationPhase:
    """``phase`` updated from one ``virDomainGetJobStats`` dict read at ``now``. Pure.

    Progress (``last_progress = now``) is a higher ``memory_iteration`` or a smaller
    ``data_remaining`` than last read; fields libvirt left out keep their last value."""
    iteration = _int(stats, "memory_iteration")
    remaining = _int(stats, "data_remaining")
    rate, page = _int(stats, "memory_dirty_rate"), _int(stats, "memory_page_size")
    elapsed = _int(stats, "time_elapsed")
    advanced = ((iteration is not None and (phase.iteration is None or iteration > phase.iteration))
                or (remaining is not None and (phase.data_remaining_bytes is None
                                               or remaining < phase.data_remaining_bytes)))
    return dataclasses.replace(
        phase,
        iteration=max(iteration, phase.iteration or 0) if iteration is not None else phase.iteration,
        data_remaining_bytes=remaining if remaining is not None else phase.data_remaining_bytes,
        data_total_bytes=_int(stats, "data_total") or phase.data_total_bytes,
        data_processed_bytes=_int(stats, "data_processed") or phase.data_processed_bytes,
        dirty_rate_bytes_per_second=(float(rate * page) if rate is not None and page is not None
                                     else phase.dirty_rate_bytes_per_second),
        elapsed_seconds=elapsed / 1000 if elapsed is not None else phase.elapsed_seconds,
        last_progress=now if advanced else phase.last_progress,
    )


class MigrationTracker:
    """Migrations in progress by guest UUID, and the count of ended ones by (direction, result).

    :attr:`version` grows with every change (the metrics collector caches on it);
    :attr:`outcomes` keeps the last ended migrations (newest last, at most ``keep``).
    """

    def __init__(self, keep: int = 100) -> None:
        self._phases: dict[str, MigrationPhase] = {}
        self.counts: dict[tuple[str, str], int] = {(d, r): 0 for d in ("in", "out") for r in (OK, FAILED)}
        self.outcomes: list[MigrationOutcome] = []
        self._keep = keep
        self.version = 0

    # -- reading -----------------------------------------------------------
    def phases(self) -> dict[str, MigrationPhase]:
        """Migrations in progress, by UUID (a copy)."""
        return dict(self._phases)

    def direction(self, uuid: str) -> str:
        """``in``, ``out``, or ``""`` when guest ``uuid`` is not migrating."""
        phase = self._phases.get(uuid)
        return phase.direction if phase is not None else ""

    def outgoing(self) -> dict[str, str]:
        """Guests migrating out, UUID → name: the poller reads their ``jobStats``."""
        return {u: p.name for u, p in self._phases.items() if p.direction == "out"}

    # -- writing -----------------------------------------------------------
    def __call__(self, ev: Event) -> None:
        """Event pump subscriber: :meth:`on_event`."""
        self.on_event(ev)

    def on_event(self, ev: Event) -> None:
        """Apply one event (only domain lifecycle, ``migration_iteration`` and ``job_completed`` matter)."""
        if ev.source != Source.DOMAIN or not ev.uuid:
            return
        phase = self._phases.get(ev.uuid)
        if ev.kind == "migration_iteration":
            iteration = ev.payload.get("iteration")
            if phase is not None and phase.direction == "in":
                return  # libvirt sends iterations on the source only; nothing to do here
            base = phase or self._begin(ev, "out")
            self._put(dataclasses.replace(base, last_progress=ev.time,
                                          iteration=iteration if isinstance(iteration, int) else base.iteration))
        elif ev.kind == "job_completed":
            op = (ev.payload.get("params") or {}).get("operation")
            if phase is not None and ((op == JOB_OPERATION_MIGRATION_OUT and phase.direction == "out")
                                      or (op == JOB_OPERATION_MIGRATION_IN and phase.direction == "in")):
                self._end(phase, OK, "job completed", ev.time)
        elif ev.kind == Kind.LIFECYCLE:
            self._lifecycle(ev, phase)

    def _lifecycle(self, ev: Event, phase: MigrationPhase | None) -> None:
        migrated = ev.detail == "MIGRATED"
        if ev.event == Lifecycle.STARTED and migrated:
            self._put(self._begin(ev, "in"))  # the incoming copy exists, paused
        elif ev.event == Lifecycle.SUSPENDED and migrated and (phase is None or phase.direction == "out"):
            self._put(dataclasses.replace(phase or self._begin(ev, "out"), last_progress=ev.time))
        elif phase is None:
            if ev.event == Lifecycle.STOPPED and migrated:  # too quick for any sign before: still a move out
                self._end(self._begin(ev, "out"), OK, "stopped: migrated", ev.time)
        elif ev.event == Lifecycle.RESUMED and migrated:
            if phase.direction == "in":
                self._end(phase, OK, "resumed: migration in complete", ev.time)
            else:
                self._end(phase, FAILED, "the source resumed the guest: migration out failed", ev.time)
        elif ev.event == Lifecycle.STOPPED:
            if phase.direction == "out" and migrated:
                self._end(phase, OK, "stopped: migrated", ev.time)
            elif phase.direction == "in":
                self._end(phase, FAILED, f"incoming copy stopped ({ev.detail}): migration in failed", ev.time)
            else:
                self._end(phase, FAILED, f"stopped ({ev.detail}) while migrating out", ev.time)

    def on_job(self, uuid: str, running: bool, stats: Mapping[str, Any] | None, now: float) -> None:
        """One ``jobStats`` reading of a guest migrating out (:meth:`outgoing`), at ``now``.

        Args:
            uuid: the guest.
            running: the guest is still active (``virDomainIsActive``); False: its stop event
                decides (a finished migration stops it before its job ends).
            stats: ``virDomainGetJobStats()`` (``type`` is virDomainJobType); None: not read.
        """
        phase = self._phases.get(uuid)
        if phase is None or phase.direction != "out" or stats is None:
            return
        if stats.get("type", JOB_NONE) == JOB_NONE:
            if running:
                self._end(phase, FAILED, "no migration job any more and the guest still runs here", now)
            return
        updated = apply_job_stats(phase, stats, now)
        if updated != phase:
            self._put(updated)

    def _begin(self, ev: Event, direction: Direction) -> MigrationPhase:
        return MigrationPhase(name=ev.name, uuid=ev.uuid, direction=direction, started=ev.time,
                              last_progress=ev.time)

    def _put(self, phase: MigrationPhase) -> None:
        self._phases[phase.uuid] = phase
        self.version += 1

    def _end(self, phase: MigrationPhase, result: str, why: str, now: float) -> None:
        self._phases.pop(phase.uuid, None)
        self.counts[(phase.direction, result)] = self.counts.get((phase.direction, result), 0) + 1
        self.outcomes.append(MigrationOutcome(phase.name, phase.uuid, phase.direction, result, why, now))
        del self.outcomes[:-self._keep]
        self.version += 1
