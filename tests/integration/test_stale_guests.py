"""A guest stuck past the poll deadline is marked stale; later polls ask only the
responsive guests, and the stuck one comes back once it answers.

The stats source wraps the real test-driver source and blocks the calls that
involve one chosen guest (the test driver itself never hangs, a real QEMU in a
long job or a dead NFS mount does).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from virtwatch.config import load_settings
from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.calls import Calls
from virtwatch.virt.stats import LibvirtStatsSource, StatsPoller

from prometheus_client import CollectorRegistry
from testkit import ReadyConnection


class StuckGuestSource(LibvirtStatsSource):
    """Blocks any call touching ``stuck_name`` until ``release`` is set."""

    def __init__(self, stuck_name: str) -> None:
        self.stuck_name = stuck_name
        self.release = threading.Event()
        self.calls: list[tuple[str, list[str]]] = []

    def all_domains(self, conn: Any, flags: int) -> list:
        out = super().all_domains(conn, flags)
        self.calls.append(("all", sorted(d.name() for d, _ in out)))
        if any(d.name() == self.stuck_name for d, _ in out):
            self.release.wait(30)
        return out

    def some_domains(self, conn: Any, doms: list, flags: int) -> list:
        names = sorted(d.name() for d in doms)
        self.calls.append(("some", names))
        if self.stuck_name in names:
            self.release.wait(30)
        return super().some_domains(conn, doms, flags)


async def test_stuck_guest_goes_stale_and_recovers(actor, make_guests) -> None:
    doms = await asyncio.to_thread(make_guests, "stale", 3)
    names = sorted(d.name() for d in doms)
    stuck = names[0]
    source = StuckGuestSource(stuck)
    registry = CollectorRegistry()
    instruments = Instruments(registry)
    settings = load_settings(None, {"stats.poll_interval": 1.0, "stats.poll_timeout": 0.3, "stats.host": False})
    calls = Calls(instruments, 8)
    poller = StatsPoller(settings.stats, ReadyConnection(actor), calls, instruments, source=source)
    try:

        # first poll: the bulk call hangs past the deadline -> each guest probed alone
        source.release.clear()
        snap = await poller.poll_once()
        assert registry.get_sample_value("libvirt_poll_errors_total") == 1
        by_name = {d.name: d for d in snap.domains.values()}
        assert by_name[stuck].stale is True
        assert all(by_name[n].stale is False for n in names[1:])
        stuck_uuid = next(d.UUIDString() for d in doms if d.name() == stuck)
        assert [d.uuid for d in snap.domains.values() if d.stale] == [stuck_uuid]
        assert poller.stale == frozenset({stuck_uuid})

        # next poll: only the responsive guests in one call; the stuck probe is still in flight
        source.calls.clear()
        snap = await poller.poll_once()
        bulk = [c for c in source.calls if c[0] == "some" and len(c[1]) > 1]
        assert bulk and stuck not in bulk[0][1]
        assert all(n in bulk[0][1] for n in names[1:])
        assert not any(c[0] == "all" for c in source.calls)
        assert {d.name: d.stale for d in snap.domains.values()}[stuck] is True

        # the guest answers again -> fresh on the next poll, and bulk polling resumes after
        source.release.set()
        await asyncio.sleep(0.1)
        snap = await poller.poll_once()
        assert {d.name: d.stale for d in snap.domains.values()}[stuck] is False
        assert poller.stale == frozenset()
        source.calls.clear()
        await poller.poll_once()
        assert source.calls[0][0] == "all"
    finally:
        source.release.set()
        calls.shutdown()
