"""infra.tasks: listener fan-out that survives a failing listener; task sets."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from virtwatch.infra.tasks import TaskSet, notify_all


class Listener:
    def __init__(self, name: str, calls: list[str], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def connection_lost(self) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} broke")

    def __repr__(self) -> str:
        return f"<Listener {self.name}>"


def test_notify_all_calls_every_listener_in_order_and_logs_the_one_that_raises() -> None:
    calls: list[str] = []
    listeners = [Listener("a", calls), Listener("b", calls, fail=True), Listener("c", calls)]
    with capture_logs() as logs:
        notify_all(listeners, lambda listener: listener.connection_lost(), log_event="connection_listener_failed")
    assert calls == ["a", "b", "c"]
    assert logs == [{"event": "connection_listener_failed", "log_level": "error", "listener": "<Listener b>",
                     "error": "RuntimeError('b broke')"}]


def test_notify_all_iterates_over_a_copy() -> None:
    calls: list[str] = []
    listeners: list[Listener] = []
    first = Listener("first", calls)
    listeners.append(first)

    def call(listener: Listener) -> None:
        listener.connection_lost()
        listeners.append(Listener("added", calls))  # e.g. a listener that registers another

    notify_all(listeners, call, log_event="x")
    assert calls == ["first"] and len(listeners) == 2


async def test_task_set_keeps_tasks_until_they_end_then_runs_on_done() -> None:
    tasks = TaskSet()
    gate = asyncio.Event()
    ended: list[tuple[str, int]] = []

    async def work() -> None:
        await gate.wait()

    tasks.spawn(work(), name="job-1", on_done=lambda t: ended.append((t.get_name(), len(tasks))))
    tasks.spawn(work(), name="job-2")
    assert len(tasks) == 2 and tasks.names() == {"job-1", "job-2"}
    gate.set()
    await tasks.wait(5.0)
    assert len(tasks) == 0 and tasks.names() == set()
    assert ended == [("job-1", 1)]  # on_done runs after the task left the set (job-2 may still be in it)


async def test_task_set_wait_is_bounded_and_cancel_stops_everything() -> None:
    tasks = TaskSet()
    forever = [tasks.spawn(asyncio.Event().wait(), name=f"idle-{i}") for i in range(3)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    await tasks.wait(0.05)
    assert 0.04 <= loop.time() - start < 2.0 and len(tasks) == 3  # still running: they go on
    tasks.cancel()
    await tasks.wait(5.0)
    assert len(tasks) == 0 and all(t.cancelled() for t in forever)
