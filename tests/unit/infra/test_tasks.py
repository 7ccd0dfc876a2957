"""infra.tasks: listener fan-out that survives a failing listener; task sets."""

from __future__ import annotations

from structlog.testing import capture_logs

from virtwatch.infra.tasks import notify_all


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
