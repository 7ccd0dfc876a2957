"""Lanes open their connections without a socket watch (``ThreadSafeAsyncIOImpl.unwatched``),
so their calls never touch the loop, on the real libvirtd.

A watched connection's every call disables and re-enables its socket watch from the
calling thread (libvirt's RPC client "buck passing"): libvirt calls the event
implementation from the lane's thread and the loop has to wake up and apply it. An
unwatched connection does its own I/O on its thread: no event, no keepalive, and no
call into the event implementation at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import libvirt
import pytest
from prometheus_client import CollectorRegistry

from hostlib import URI
from virtwatch.config import load_settings
from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.lanes import LanePool

CALLS = 20


def stats(conn: libvirt.virConnect) -> int:
    return len(conn.getAllDomainStats(0, 0))


async def calls_off_loop(event_impl: Any, unwatched: bool) -> tuple[int, int, bool]:
    """(event implementation calls made off the loop, live handles and timers added by the
    lane's open, every call saw the main connection's guests) for CALLS bulk calls on a
    fresh stats lane."""
    settings = load_settings(None, {"libvirt.uri": URI})
    main = await asyncio.to_thread(libvirt.openReadOnly, URI)
    pool = LanePool(settings.libvirt, True, Instruments(CollectorRegistry()), 1,
                    unwatched=event_impl.unwatched if unwatched else None)
    pool.connection_ready(main)
    try:
        live = event_impl.live_callbacks()
        await pool.run("stats", "getAllDomainStats", stats, timeout=10)  # opens the lane
        added = event_impl.live_callbacks() - live
        before = event_impl.submitted_off_loop
        seen = [await pool.run("stats", "getAllDomainStats", stats, timeout=10) for _ in range(CALLS)]
        ops = event_impl.submitted_off_loop - before
        return ops, added, seen == [await asyncio.to_thread(stats, main)] * CALLS
    finally:
        await pool.stop(timeout=5.0)
        await asyncio.to_thread(main.close)


async def test_an_unwatched_lane_never_calls_the_event_implementation(event_impl: Any) -> None:
    watched_ops, watched_added, watched_same = await calls_off_loop(event_impl, unwatched=False)
    ops, added, same = await calls_off_loop(event_impl, unwatched=True)
    print(f"\n{CALLS} bulk calls: watched lane {watched_ops} event-implementation calls off the loop "
          f"({watched_added} handles/timers at open), unwatched lane {ops} ({added})")
    assert watched_same and same
    assert watched_added >= 1 and watched_ops >= 2 * CALLS  # the watch off and on again, per call
    assert (added, ops) == (0, 0)


async def test_an_unwatched_connection_has_no_keepalive(event_impl: Any) -> None:
    def open_and_keepalive() -> list[str]:
        with event_impl.unwatched():
            conn = libvirt.openReadOnly(URI)
        try:
            with pytest.raises(libvirt.libvirtError) as err:
                conn.setKeepAlive(5, 3)
            assert "keepalive" in str(err.value)
            return sorted(d.name() for d in conn.listAllDomains())  # calls still work, on this thread
        finally:
            conn.close()

    names = await asyncio.to_thread(open_and_keepalive)
    # the refusal was for that block only: a connection opened after it is watched again
    live = event_impl.live_callbacks()
    conn = await asyncio.to_thread(libvirt.openReadOnly, URI)
    try:
        assert event_impl.live_callbacks() > live
        assert names == sorted(d.name() for d in await asyncio.to_thread(conn.listAllDomains))
    finally:
        await asyncio.to_thread(conn.close)
