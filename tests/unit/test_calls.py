"""Calls: deadlines, error counting and retired connections (on libvirt's in-process test driver)."""

from __future__ import annotations

import asyncio
import threading

import libvirt
import pytest
from prometheus_client import CollectorRegistry

from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.calls import Calls, CallTimeout, ConnectionRetired


def _version(conn: libvirt.virConnect) -> int:
    return conn.getLibVersion()


async def test_a_retired_connection_is_never_called_again() -> None:
    registry = CollectorRegistry()
    calls = Calls(Instruments(registry), 1, 5.0)
    conn = libvirt.open("test:///default")
    try:
        assert await calls.run("getLibVersion", _version, conn) > 0
        calls.retire(conn)
        for fn, args in ((_version, (conn,)), (conn.getLibVersion, ())):  # as an argument or a bound method
            with pytest.raises(ConnectionRetired) as err:
                await calls.run("getLibVersion", fn, *args)
            assert err.value.get_error_code() is None and "connection is closed" in str(err.value)
        assert registry.get_sample_value("libvirt_api_errors_total",
                                         {"call": "getLibVersion", "code": "connection_closed"}) == 2
        # the closer's own teardown calls still run, and nothing is in flight afterwards
        assert await calls.run("getLibVersion", _version, conn, allow_retired=True) > 0
        assert calls.in_flight_on(conn) == 0 and await calls.wait_idle(conn, 0.1)
        calls.forget(conn)
        assert await calls.run("getLibVersion", _version, conn) > 0
    finally:
        conn.close()
        calls.shutdown()


async def test_wait_idle_waits_for_a_call_still_running_on_the_connection() -> None:
    calls = Calls(Instruments(CollectorRegistry()), 1, 5.0)
    conn = libvirt.open("test:///default")
    release = threading.Event()

    def slow(c: libvirt.virConnect) -> int:
        release.wait(5)
        return c.getLibVersion()

    try:
        with pytest.raises(CallTimeout):
            await calls.run("slow", slow, conn, timeout=0.05)
        assert calls.in_flight_on(conn) == 1          # timed out for the caller, still inside the call
        assert not await calls.wait_idle(conn, 0.1)
        release.set()
        assert await calls.wait_idle(conn, 5.0)
    finally:
        conn.close()
        calls.shutdown()


async def test_a_call_that_timed_out_while_queued_never_runs() -> None:
    # one calling thread: callers who gave up must not leave a backlog behind a slow call
    calls = Calls(Instruments(CollectorRegistry()), 1, 5.0)
    release = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        release.wait(5)
        ran.append("slow")

    try:
        first = asyncio.ensure_future(calls.run("slow", slow, timeout=5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(CallTimeout):
            await calls.run("queued", lambda: ran.append("queued"), timeout=0.05)
        release.set()
        await first
        assert await calls.run("after", lambda: ran.append("after") or len(ran)) == 2
        assert ran == ["slow", "after"]
    finally:
        calls.shutdown()
