"""The stats poller survives a host-stats call refused mid-poll and any unexpected
error in one poll: it never dies, it counts the failed poll and polls again.

(CI once caught the poller task dead after a keepalive reconnect: the host-stats
call was refused on a connection retired meanwhile, and the ``ConnectionRetired``
it raised was not caught. ``libvirt_up`` was 1 again but no poll ever ran after.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import libvirt
import pytest_asyncio

from testkit import PollerRig, until
from virtwatch.virt.calls import ConnectionRetired
from virtwatch.virt.stats import HostStats, LibvirtStatsSource, StatsPoller


class RefusedHostOnceSource(LibvirtStatsSource):
    """The first host-stats call is refused as on a connection retired under it."""

    def __init__(self) -> None:
        self.refused = False

    def host(self, conn: Any, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
        if not self.refused:
            self.refused = True
            raise ConnectionRetired("hostStats")
        return super().host(conn, on_error)


class FailingOnceSource(LibvirtStatsSource):
    """Raises an unexpected (non-libvirt) error in the first poll only."""

    def __init__(self) -> None:
        self.failed = False

    def bulk(self, conn: Any, exclude: frozenset[str], flags: int) -> list:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected")
        return super().bulk(conn, exclude, flags)


@pytest_asyncio.fixture
async def rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    r = PollerRig(actor, **{"stats.poll_interval": 1.0, "stats.host": True})
    yield r
    await r.close()


async def test_host_stats_refused_fails_one_poll(actor, make_guests, rig: PollerRig) -> None:
    await asyncio.to_thread(make_guests, "retire", 2)
    poller = StatsPoller(rig.settings.stats, rig.connection, rig.lanes, rig.instruments,
                         source=RefusedHostOnceSource(), wall=lambda: 1000.0)

    snap = await poller.poll_once()  # before the fix: ConnectionRetired escaped here
    assert snap is not None and snap.host is None
    assert rig.value("libvirt_poll_errors_total") == 1
    assert rig.value("libvirt_api_errors_total", call="hostStats", code="connection_closed") == 1
    assert rig.value("libvirt_last_poll_success_timestamp_seconds") == 0
    assert len([d for d in snap.domains.values() if d.name.startswith("retire") and not d.stale]) == 2

    snap = await poller.poll_once()
    assert snap is not None and snap.host is not None and snap.host.node_info is not None
    assert snap.host.collected_at == 1000.0
    assert rig.value("libvirt_last_poll_success_timestamp_seconds") == 1000.0
    assert rig.value("libvirt_poll_errors_total") == 1


async def test_unexpected_error_costs_one_poll_not_the_poller(actor, make_guests, rig: PollerRig) -> None:
    await asyncio.to_thread(make_guests, "oops", 1)
    settings = rig.settings.model_copy(update={"stats": rig.settings.stats.model_copy(
        update={"poll_interval": 0.1, "host": False})})
    snaps: list[Any] = []
    poller = StatsPoller(settings.stats, rig.connection, rig.lanes, rig.instruments,
                         source=FailingOnceSource(), on_snapshot=snaps.append)
    task = asyncio.get_running_loop().create_task(poller.run())
    try:
        await until(lambda: len(snaps) >= 2, 10, "two snapshots after the failed poll")
        assert not task.done()
        assert rig.value("libvirt_poll_errors_total") == 1
        assert any(d.name.startswith("oops") for d in snaps[-1].domains.values())
    finally:
        task.cancel()
