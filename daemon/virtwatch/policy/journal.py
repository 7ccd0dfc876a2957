"""Retention of the policy's event journal (the ``events`` table of ``virtwatch.sqlite``).

The engine appends one row per domain event it processes, so without pruning
the journal grows for as long as the host runs. :class:`JournalPruner` deletes
rows older than ``[policy] journal_max_age`` and beyond the newest
``journal_max_events``: once at start, then every :data:`JOURNAL_PRUNE_INTERVAL`
seconds of its clock, in a worker thread on a connection of its own
(:func:`~virtwatch.policy.store.prune_journal`), so the loop never waits for it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import structlog

from .clock import Clock
from .store import JournalPrune, prune_journal

#: Seconds between two prunes (the first runs at start).
JOURNAL_PRUNE_INTERVAL = 3600.0

log = structlog.get_logger("virtwatch.policy")


class JournalPruner:
    """Keeps the event journal of the database at ``path`` bounded.

    Args:
        path: the policy database (it must exist: opened by the Store first).
        max_age: rows whose event time is older than this many seconds are deleted.
        max_events: at most this many rows are kept (the newest).
        clock: ``time()`` gives the age cut-off, ``sleep()`` the schedule.
        interval: seconds between prunes.
        logger: structlog logger (``policy_journal_pruned``, ``policy_journal_prune_failed``).
    """

    def __init__(self, path: str | os.PathLike[str], max_age: float, max_events: int, clock: Clock,
                 interval: float = JOURNAL_PRUNE_INTERVAL, logger: Any = None) -> None:
        self._path = path
        self._max_age = max_age
        self._max_events = max_events
        self._clock = clock
        self._interval = interval
        self._log = logger or log
        self._stop = threading.Event()

    async def prune(self) -> JournalPrune | None:
        """Prune once in a worker thread. Logs ``policy_journal_pruned`` (info) when rows
        were deleted; returns what was done, or None after a failure (logged, not raised)."""
        cutoff = self._clock.time() - self._max_age
        try:
            r = await asyncio.to_thread(prune_journal, self._path, cutoff, self._max_events, stop=self._stop.is_set)
        except Exception as err:  # housekeeping: a failure (locked, disk error, bug) must not end the schedule
            self._log.warning("policy_journal_prune_failed", path=str(self._path), error=str(err),
                              retry_in_seconds=self._interval)
            return None
        if r.by_age or r.by_count:
            self._log.info("policy_journal_pruned", deleted_by_age=r.by_age, deleted_by_count=r.by_count,
                           kept=r.kept, max_age_seconds=self._max_age, max_events=self._max_events)
        return r

    async def run(self) -> None:
        """Prune now, then every ``interval`` seconds, until cancelled."""
        while not self._stop.is_set():
            await self.prune()
            await self._clock.sleep(self._interval)

    def stop(self) -> None:
        """Ask a prune in progress to end after its current batch (then cancel :meth:`run`)."""
        self._stop.set()
