"""virtwatch benchmarks: print figures (never pass/fail).

    .venv/bin/python bench/run_all.py [--quick]

1. poll time for N guests on libvirt's test driver (getAllDomainStats + snapshot);
2. /metrics render time for 100 and 1,000 synthetic guests built from recorded real
   getAllDomainStats dicts (first = the first render, cold = a new snapshot, warm = cached state part);
3. events/s through the pump, end to end (test-driver lifecycle events → subscribers);
4. RSS of a real ``virtwatch run`` process on a generated test-driver host with N guests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import libvirt
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))  # testkit, used by hostlib

from virtwatch.app import Daemon  # noqa: E402
from virtwatch.config import load_settings  # noqa: E402
from virtwatch.logs import configure_logging  # noqa: E402
from virtwatch.metrics.collector import Exposition, StateCollector  # noqa: E402
from virtwatch.metrics.instruments import Instruments  # noqa: E402
from virtwatch.state import GuestRegistry, ResyncEntry  # noqa: E402
from virtwatch.virt.aio import register_event_impl  # noqa: E402
from virtwatch.virt.stats import DomainStats, Snapshot  # noqa: E402

_IMPL: list = []  # the process's one libvirt event implementation, registered by main()


def host_xml(n: int) -> str:
    """A test-driver host definition with ``n`` running guests."""
    doms = "".join(
        f"<domain type='test'><name>g{i:05d}</name><uuid>{uuid.uuid4()}</uuid><memory>65536</memory>"
        f"<vcpu>1</vcpu><os><type>hvm</type></os></domain>" for i in range(n))
    return f"<node><cpu><mhz>2400</mhz><model>x86_64</model><active>8</active></cpu>{doms}</node>"


async def bench_poll(sizes: list[int]) -> list[dict]:
    out = []
    impl = _IMPL[0]
    for n in sizes:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as fh:
            fh.write(host_xml(n))
        settings = load_settings(None, {"libvirt.uri": f"test://{fh.name}", "http.listen": "127.0.0.1:0",
                                        "stats.poll_interval": 3600, "log.events": False, "log.level": "error"})
        d = Daemon(settings, impl, registry=CollectorRegistry())
        await d.start()
        await d.connection.ready.wait()
        await asyncio.sleep(0.2)  # let the scheduled first poll finish
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            snap = await d.poller.poll_once()
            if snap is not None:
                times.append(time.perf_counter() - t0)
        await d.stop()
        os.unlink(fh.name)
        out.append({"guests": n, "poll_median_ms": round(statistics.median(times) * 1000, 2),
                    "poll_max_ms": round(max(times) * 1000, 2), "polls": len(times)})
    return out


def bench_render(recorded: dict, sizes: list[int]) -> list[dict]:
    out = []
    real = recorded["domains"]
    for n in sizes:
        reg = GuestRegistry()
        entries, doms = [], {}
        for i in range(n):
            src = real[i % len(real)]
            name, u = f"guest-{i:05d}", str(uuid.uuid4())
            st = src["stats"]
            entries.append(ResyncEntry(name, u, st["state.state"], st["state.reason"], True, False))
            doms[u] = DomainStats(name, u, st, False, time.time())
        reg.apply_resync(entries, 0)
        holder = {"snap": Snapshot(1, time.time(), 0.0, doms, None)}
        live = CollectorRegistry()
        Instruments(live)
        exp = Exposition(live, StateCollector(reg, lambda holder=holder: holder["snap"], lambda: {}))
        cold = []
        for k in range(5):
            holder["snap"] = Snapshot(k + 2, time.time(), 0.0, doms, None)
            t0 = time.perf_counter()
            body = exp.render()
            cold.append(time.perf_counter() - t0)
        warm = []
        for _ in range(20):
            t0 = time.perf_counter()
            exp.render()
            warm.append(time.perf_counter() - t0)
        # first: the very first render (every guest's label prefixes built); cold: a new snapshot
        out.append({"guests": n, "render_first_ms": round(cold[0] * 1000, 1),
                    "render_cold_median_ms": round(statistics.median(cold[1:]) * 1000, 1),
                    "render_warm_median_ms": round(statistics.median(warm) * 1000, 2),
                    "body_bytes": len(body), "samples": body.count(b"\n") - body.count(b"\n#")})
    return out


async def bench_events(n_guests: int, rounds: int) -> dict:
    settings = load_settings(None, {"libvirt.uri": "test:///default", "http.listen": "127.0.0.1:0",
                                    "stats.poll_interval": 3600, "log.events": False, "log.level": "error"})
    d = Daemon(settings, _IMPL[0], registry=CollectorRegistry())
    await d.start()
    await d.connection.ready.wait()
    actor = libvirt.open("test:///default")
    doms = [actor.createXML(f"<domain type='test'><name>ev{i}</name><uuid>{uuid.uuid4()}</uuid><memory>8192"
                            f"</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>", 0)
            for i in range(n_guests)]
    await asyncio.sleep(0.2)
    await d.pump.wait_idle()
    start_count = d.pump.delivered

    def storm() -> None:
        for _ in range(rounds):
            for dom in doms:
                dom.suspend()
                dom.resume()

    t0 = time.perf_counter()
    await asyncio.to_thread(storm)
    generated = 2 * rounds * n_guests
    while d.pump.delivered - start_count < generated:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    for dom in doms:
        dom.destroy()
    actor.close()
    await d.stop()
    return {"guests": n_guests, "events": generated, "seconds": round(elapsed, 3),
            "events_per_second": round(generated / elapsed)}


def bench_rss(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "host.xml"
        xml.write_text(host_xml(n))
        port = 19300 + n % 500
        proc = subprocess.Popen([sys.executable, "-m", "virtwatch", "run", "--uri", f"test://{xml}",
                                 "--listen", f"127.0.0.1:{port}", "--poll-interval", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                    break
                except Exception:
                    time.sleep(0.2)
            time.sleep(3)
            for _ in range(5):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            status = {}
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    status[k] = int(v.split()[0])
            return {"guests": n, "rss_mib": round(status["VmRSS"] / 1024, 1),
                    "peak_rss_mib": round(status["VmHWM"] / 1024, 1)}
        finally:
            proc.terminate()
            proc.wait(10)


async def main(quick: bool) -> dict:
    configure_logging("console", "error")
    _IMPL.append(register_event_impl())
    recorded = json.loads((ROOT / "tests/fixtures/domstats-libvirt9-qemu7.2.json").read_text())
    results = {}
    results["poll"] = await bench_poll([100] if quick else [100, 1000])
    results["render"] = bench_render(recorded, [100, 1000])
    results["events"] = await bench_events(100, 10 if quick else 50)
    results["rss"] = [bench_rss(n) for n in ([5] if quick else [5, 1000])]
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    res = asyncio.run(main(args.quick))
    for section, rows in res.items():
        print(f"== {section}")
        for row in rows if isinstance(rows, list) else [rows]:
            print("   " + "  ".join(f"{k}={v}" for k, v in row.items()))
