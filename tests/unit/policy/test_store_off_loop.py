"""The policy store never blocks the event loop: its SQLite commits (fsync'd, ``synchronous=FULL``)
run on the store's own thread, while the engine goes on with other guests and timers."""

from __future__ import annotations

import asyncio
import threading

from virtwatch.model import DomainState, RunningReason

from .rig import Rig

BASE = {
    "debounce": 0.5, "boot_settle_timeout": 0, "start_delay": 0,
    "defaults": {"restart_delay": 10, "restart_jitter": 0},
    "match": [{"glob": "*"}],
}


async def test_no_store_commit_runs_on_the_event_loop_thread(tmp_path):
    committers: list[int] = []
    r = Rig(tmp_path, BASE, on_commit=lambda: committers.append(threading.get_ident()))
    try:
        r.hv.add("web1", state=DomainState.RUNNING, reason=RunningReason.BOOTED)
        await r.start()
        r.hv.crash("web1")
        await r.run(12)
        assert r.hv.count("start") == 1
        # the crash noted, the stop decided, the action opened and closed, the start seen...
        assert len(committers) >= 5, committers
        assert threading.get_ident() not in committers
        assert len(set(committers)) == 1  # one thread owns the connection
    finally:
        await r.close()


async def test_the_loop_runs_while_a_commit_waits_for_the_disk(tmp_path):
    loop_ran = threading.Event()
    armed = threading.Event()
    waits: list[bool] = []

    def slow_disk() -> None:
        # the first commit after arming lasts until the loop has run again (2 s at most)
        if armed.is_set() and not waits:
            loop_ran.clear()
            waits.append(loop_ran.wait(2.0))

    async def heartbeat() -> None:
        while True:
            loop_ran.set()
            await asyncio.sleep(0.001)

    r = Rig(tmp_path, BASE, on_commit=slow_disk)
    beat = None
    try:
        r.hv.add("web1", state=DomainState.RUNNING, reason=RunningReason.BOOTED)
        await r.start()
        beat = asyncio.ensure_future(heartbeat())
        armed.set()
        r.hv.crash("web1")
        await r.run(12)
        assert waits == [True]
        assert r.hv.count("start") == 1  # the slow commit delayed nothing but itself
    finally:
        if beat is not None:
            beat.cancel()
        await r.close()
