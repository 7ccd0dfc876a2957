"""Listener fan-out that survives a bad listener."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import structlog

log = structlog.get_logger("virtwatch.tasks")

L = TypeVar("L")


def notify_all(listeners: Iterable[L], fn: Callable[[L], object], *, log_event: str) -> None:
    """Call ``fn(listener)`` for each listener, in order, over a copy of ``listeners``
    (a listener may add or remove listeners). One that raises is logged as
    ``log_event`` (with ``listener`` and ``error`` as reprs) and the rest are
    still called; nothing is raised."""
    for listener in list(listeners):
        try:
            fn(listener)
        except Exception as err:
            log.error(log_event, listener=repr(listener), error=repr(err))
