"""Fire-and-forget tasks kept alive, and listener fan-out that survives a bad listener."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

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


class TaskSet:
    """Tasks started and not awaited by their starter. The loop holds tasks only
    weakly, so each one is referenced here until it ends, then dropped."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str,
              on_done: Callable[[asyncio.Task[Any]], object] | None = None) -> asyncio.Task[Any]:
        """Start ``coro`` as a task named ``name`` on the running loop; ``on_done(task)``
        runs when it ends, after it left the set. Raises RuntimeError without a running loop."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if on_done is not None:
            task.add_done_callback(on_done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def names(self) -> set[str]:
        """Names of the tasks still running."""
        return {t.get_name() for t in self._tasks}

    def cancel(self) -> None:
        """Ask every task to stop (they leave the set once they have)."""
        for t in list(self._tasks):
            t.cancel()

    async def wait(self, timeout: float | None) -> None:
        """Wait until every task has ended, at most ``timeout`` seconds (None: no limit);
        tasks still running then go on. Never raises for a task's failure."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
