"""Keepalive end to end: libvirtd frozen with SIGSTOP is noticed by libvirt's
keepalive (its timers run on the daemon's loop through libvirtaio), reported as
``libvirt_up 0``, and the daemon reconnects by itself after SIGCONT.

libvirtd is always thawed in a ``finally`` block, whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from hostlib import URI, libvirtd_pid, start_libvirtd, thaw
from hostlib.daemon import VirtwatchProcess, sample
from virtwatch.app import Daemon
from virtwatch.config import load_settings

INTERVAL, COUNT = 1, 2
SLACK = 3.0  # seconds on top of interval × (count + 1): RPC in flight, timer granularity, loop latency


async def metrics(d: Daemon) -> dict[str, float]:
    host, port = d.listen_address
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/metrics") as r:
        text = await r.text()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name in ("libvirt_up", "libvirt_connection_reconnects_total")}


async def until_metric(d: Daemon, name: str, want: float, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (await metrics(d)).get(name) != want:
        if loop.time() - start > timeout:
            raise AssertionError(f"{name} != {want} after {timeout} s")
        await asyncio.sleep(0.05)
    return loop.time() - start


async def test_frozen_libvirtd_is_detected_and_survived(event_impl: Any, tmp_path: Path) -> None:
    settings = load_settings(None, {
        "libvirt.uri": URI, "libvirt.keepalive_interval": INTERVAL, "libvirt.keepalive_count": COUNT,
        "libvirt.reconnect_min_delay": 0.5, "libvirt.reconnect_max_delay": 2.0, "libvirt.call_timeout": 5.0,
        "http.listen": "127.0.0.1:0", "stats.poll_interval": 600.0, "log.events": False,
        "daemon.state_dir": str(tmp_path)})
    await asyncio.to_thread(start_libvirtd)  # idempotent: a libvirtd an earlier freeze crashed is back
    d = Daemon(settings, event_impl)
    await d.start()
    try:
        await asyncio.wait_for(d.connection.ready.wait(), 30)
        before = await metrics(d)
        assert before["libvirt_up"] == 1
        pid = libvirtd_pid()
        bound = INTERVAL * (COUNT + 1) + SLACK
        os.kill(pid, signal.SIGSTOP)
        try:
            detected = await until_metric(d, "libvirt_up", 0, bound)
            reason = d.connection.close_reason
        finally:
            survived = await asyncio.to_thread(thaw, pid)
        recovered = await until_metric(d, "libvirt_up", 1, 30)
        after = await metrics(d)
        print(f"\nkeepalive interval={INTERVAL}s count={COUNT}: libvirt_up 0 after {detected:.2f} s "
              f"(bound {bound:.0f} s, close reason {reason}); libvirt_up 1 again {recovered:.2f} s after SIGCONT; "
              f"reconnects {before['libvirt_connection_reconnects_total']:.0f} -> "
              f"{after['libvirt_connection_reconnects_total']:.0f}; libvirtd survived the freeze: {survived}")
        assert reason == "keepalive"
        assert after["libvirt_connection_reconnects_total"] >= before["libvirt_connection_reconnects_total"] + 1
        assert d.healthy()
    finally:
        await d.stop()


def test_frozen_libvirtd_with_calls_in_flight_never_crashes_the_daemon(tmp_path: Path) -> None:
    """libvirtd frozen three times while the daemon polls every 100 ms, so calls are
    in flight whenever keepalive closes the connection. libvirt 9.0's client crashed
    the daemon (SIGSEGV in virNetClientIOEventLoop) at the first freeze when several
    threads called on the connection; with one calling thread per connection it
    survives every freeze and polls again after each thaw."""
    vw = VirtwatchProcess(tmp_path, config=(
        f"[libvirt]\nkeepalive_interval = {INTERVAL}\nkeepalive_count = {COUNT}\n"
        "reconnect_min_delay = 0.5\nreconnect_max_delay = 2.0\ncall_timeout = 3.0\n"
        f"[daemon]\nstate_dir = \"{tmp_path}\"\nsocket = \"{tmp_path / 'vw.sock'}\"\n[log]\nevents = false\n"),
        uri=URI, poll_interval=0.1)
    start_libvirtd()
    vw.start()
    try:
        bound = INTERVAL * (COUNT + 1) + SLACK
        figures = []
        crashed = 0
        for _ in range(3):
            pid = libvirtd_pid()
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                vw.wait_until(lambda: sample(vw.scrape(), "libvirt_up") == 0, bound, "libvirt_up never went 0",
                              interval=0.05)
                detected = time.monotonic() - t0
            finally:
                crashed += not thaw(pid)
            t1 = time.monotonic()
            vw.wait_until(lambda: sample(vw.scrape(), "libvirt_up") == 1, 30, "never reconnected", interval=0.05)
            mark = time.time()
            vw.wait_until(lambda mark=mark: (
                sample(vw.scrape(), "libvirt_last_poll_success_timestamp_seconds") or 0) > mark,
                          10, "polls did not resume")
            figures.append(f"{detected:.2f}/{time.monotonic() - t1:.2f}")
        print(f"\n3 freezes with polls every 100 ms: detected/recovered (s) {', '.join(figures)}; "
              f"libvirtd itself crashed on {crashed} of 3 thaws (restarted)")
        text = vw.log_text()
        assert text.count('"libvirt_side_connected"') >= 4  # the agent's own connection followed each reconnect
    finally:
        code = vw.stop()
    assert code == 0, vw.log_tail()
    assert "Fatal Python error" not in vw.log_text()
