"""Events stay prompt while worker threads are busy in libvirt calls (design doc §3a).

Each run is a subprocess with its own ``asyncio.run(debug=True)``: debug mode
makes asyncio reject non-thread-safe loop calls, which is exactly how stock
libvirtaio loses events once worker threads call libvirt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("latency_probe.py")


def run_probe(impl: str) -> dict:
    r = subprocess.run([sys.executable, str(PROBE), "--impl", impl, "--events", "40", "--busy-threads", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_threadsafe_impl_delivers_every_event_promptly_in_debug_mode() -> None:
    res = run_probe("threadsafe")
    assert res["generated"] == 40
    assert res["delivered"] == 40, res
    assert res["errors"] == [], res
    assert res["median_ms"] < 100, res
    assert res["late_over_100ms"] == 0, res


def test_stock_libvirtaio_fails_the_same_probe() -> None:
    """The control: without the wrapper, debug mode loses the events."""
    res = run_probe("stock")
    assert res["delivered"] < res["generated"] or res["late_over_100ms"] > 0, res
