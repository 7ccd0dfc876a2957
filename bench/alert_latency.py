#!/usr/bin/env python3
"""Event → Alertmanager latency of virtwatch's instant alerts.

Fires 20 synthetic guest-crash events (lifecycle CRASHED/PANICKED, one guest each)
through ``Alerter.on_event`` and polls Alertmanager's ``GET /api/v2/alerts`` until each
appears; prints every latency, the median and the worst.

    python bench/alert_latency.py                      # starts its own prometheus-alertmanager
    python bench/alert_latency.py --alertmanager http://127.0.0.1:9093

The measured time includes the poll period (1 ms) and one GET round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.config import AlertSettings
from virtwatch.model import Event


def start_alertmanager(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a throwaway Alertmanager on a free loopback port; return (process, URL)."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not binary:
        sys.exit("prometheus-alertmanager not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (workdir / "am.yml").write_text("route: {receiver: blackhole}\nreceivers: [{name: blackhole}]\n")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'am.yml'}", f"--storage.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("alertmanager did not become ready")


async def measure(url: str, count: int) -> list[float]:
    """Latencies (seconds) of ``count`` events, each fired after the previous one arrived."""
    al = Alerter(AlertSettings(alertmanager_urls=[url], instance="bench", min_firing_duration=0.0), CollectorRegistry())
    await al.start()
    run = f"{time.time():.0f}"
    out = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(count):
                name = f"bench-{run}-{i:02d}"
                t0 = time.perf_counter()
                al.on_event(Event(time=time.time(), seq=i, source="domain", kind="lifecycle", name=name,
                                  uuid=f"00000000-0000-0000-0000-{i:012d}", event="CRASHED", detail="PANICKED"))
                while True:
                    async with http.get(url + "/api/v2/alerts", params={"filter": f'domain="{name}"'}) as r:
                        if any(a["labels"].get("domain") == name for a in await r.json()):
                            break
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError(f"{name} never arrived")
                    await asyncio.sleep(0.001)
                out.append(time.perf_counter() - t0)
                al.resolve("VirtwatchGuestCrashed", name)
    finally:
        await al.stop(5.0)
    return out


def main() -> None:
    """Parse arguments, run the measurement, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alertmanager", help="base URL of a running Alertmanager (default: start one)")
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = args.alertmanager
        if url is None:
            proc, url = start_alertmanager(Path(tmp))
        try:
            lat = asyncio.run(measure(url, args.count))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    ms = [x * 1000 for x in lat]
    print("latencies ms:", " ".join(f"{x:.1f}" for x in ms))
    print(f"events={len(ms)} median={statistics.median(ms):.1f} ms worst={max(ms):.1f} ms")


if __name__ == "__main__":
    main()
