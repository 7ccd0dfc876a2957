"""The stats poller survives a connection retired in the middle of a poll and any
unexpected error in one poll: it never dies, it counts the failed poll and polls again.

(CI caught the poller task dead after a keepalive reconnect: the host-stats call was
queued behind a call stuck on a frozen libvirtd, the connection was retired meanwhile,
and the ``ConnectionRetired`` it raised was not caught. ``libvirt_up`` was 1 again but
no poll ever ran after.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from testkit import ReadyConnection, until

from virtwatch.config import load_settings
from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.calls import Calls
from virtwatch.virt.stats import LibvirtStatsSource, StatsPoller


class Metered:
    """A one-thread ``Calls`` and the registry its instruments count into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instruments = Instruments(self.registry)
        self.calls = Calls(self.instruments, 1)


@pytest.fixture
def metered() -> Iterator[Metered]:
    """A :class:`Metered`; its pool is shut down after the test."""
    m = Metered()
    yield m
    m.calls.shutdown()


class RetiringSource(LibvirtStatsSource):
    """Retires the connection right after the bulk stats call returns, as the
    connection manager's teardown does when keepalive closes it mid-poll."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.retire_next = True

    def all_domains(self, conn: Any, flags: int) -> list:
        out = super().all_domains(conn, flags)
        if self.retire_next:
            self.retire_next = False
            self.calls.retire(conn)
        return out


class FailingOnceSource(LibvirtStatsSource):
    """Raises an unexpected (non-libvirt) error in the first poll only."""

    def __init__(self) -> None:
        self.failed = False

    def all_domains(self, conn: Any, flags: int) -> list:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected")
        return super().all_domains(conn, flags)


async def test_connection_retired_between_calls_fails_one_poll(actor, make_guests, metered: Metered) -> None:
    await asyncio.to_thread(make_guests, "retire", 2)
    registry, calls = metered.registry, metered.calls
    settings = load_settings(None, {"stats.poll_interval": 1.0, "stats.host": True})
    poller = StatsPoller(settings.stats, ReadyConnection(actor), calls, metered.instruments,
                         source=RetiringSource(calls), wall=lambda: 1000.0)

    snap = await poller.poll_once()  # before the fix: ConnectionRetired escaped here
    assert snap is not None and snap.host is None
    assert registry.get_sample_value("libvirt_poll_errors_total") == 1
    assert registry.get_sample_value("libvirt_api_errors_total",
                                     {"call": "hostStats", "code": "connection_closed"}) == 1
    assert registry.get_sample_value("libvirt_last_poll_success_timestamp_seconds") == 0

    calls.forget(actor)  # the manager has closed it; here the same one serves again
    snap = await poller.poll_once()
    assert snap is not None and snap.host is not None and snap.host.node_info is not None
    assert registry.get_sample_value("libvirt_last_poll_success_timestamp_seconds") == 1000.0
    assert len([d for d in snap.domains.values() if d.name.startswith("retire")]) == 2


async def test_unexpected_error_costs_one_poll_not_the_poller(actor, make_guests, metered: Metered) -> None:
    await asyncio.to_thread(make_guests, "oops", 1)
    settings = load_settings(None, {"stats.poll_interval": 0.1, "stats.host": False})
    snaps: list[Any] = []
    poller = StatsPoller(settings.stats, ReadyConnection(actor), metered.calls, metered.instruments,
                         source=FailingOnceSource(), on_snapshot=snaps.append)
    task = asyncio.get_running_loop().create_task(poller.run())
    try:
        await until(lambda: len(snaps) >= 2, 10, "two snapshots after the failed poll")
        assert not task.done()
        assert metered.registry.get_sample_value("libvirt_poll_errors_total") == 1
        assert any(d.name.startswith("oops") for d in snaps[-1].domains.values())
    finally:
        task.cancel()
