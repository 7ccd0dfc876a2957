"""Measure event latency while worker threads are busy in libvirt calls.

Run as a script (the test runs it in a subprocess so it gets its own
``asyncio.run(debug=True)`` and its own libvirt event implementation):

    python latency_probe.py [--impl threadsafe|stock] [--events N] [--busy-threads N]

Prints one JSON object: per-event latencies in ms (from the moment the call
that caused the event returned to the moment the pump delivered it), the
number of events delivered, and whether asyncio reported a non-thread-safe
call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
import uuid

import libvirt
import libvirtaio
from prometheus_client import CollectorRegistry

from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.aio import register_event_impl
from virtwatch.virt.calls import Calls
from virtwatch.virt.events import EventPump, EventSubscriptions


async def main(impl_name: str, n_events: int, busy_threads: int) -> dict:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _l, ctx: errors.append(str(ctx.get("exception") or ctx.get("message"))))
    impl = register_event_impl(loop) if impl_name == "threadsafe" else libvirtaio.virEventRegisterAsyncIOImpl(loop)
    calls = Calls(Instruments(CollectorRegistry()), max_in_flight=busy_threads + 1)
    pump = EventPump(loop)
    arrived: dict[str, float] = {}
    pump.subscribe(lambda ev: arrived.setdefault(f"{ev.name}/{ev.event}", time.monotonic()))
    pump_task = loop.create_task(pump.run())
    conn = await calls.run("open", libvirt.open, "test:///default")
    subs = EventSubscriptions(pump)
    await calls.run("register", subs.register, conn)

    stop = threading.Event()

    # F821 below: conn is deleted on purpose once closed, after the last call of these helpers.
    def busy() -> int:
        n = 0
        while not stop.is_set():
            conn.listAllDomains()  # noqa: F821
            conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)  # noqa: F821
            n += 1
        return n

    busy_futs = [loop.run_in_executor(None, busy) for _ in range(busy_threads)]
    caused: dict[str, float] = {}
    xml = ("<domain type='test'><name>{n}</name><uuid>{u}</uuid><memory>8192</memory><vcpu>1</vcpu>"
           "<os><type>hvm</type></os></domain>")
    for i in range(n_events // 2):
        name = f"lat-{i}-{uuid.uuid4().hex[:6]}"

        def start_and_stop(name: str = name) -> tuple[float, float]:
            dom = conn.createXML(xml.format(n=name, u=uuid.uuid4()), 0)  # noqa: F821
            t1 = time.monotonic()
            dom.destroy()
            return t1, time.monotonic()

        t_start, t_stop = await calls.run("createXML", start_and_stop)
        caused[f"{name}/STARTED"], caused[f"{name}/STOPPED"] = t_start, t_stop
        await asyncio.sleep(0.02)
    await asyncio.sleep(3.0)  # late events still count, as late
    stop.set()
    await asyncio.gather(*busy_futs)
    latencies = [(arrived[k] - t) * 1000 for k, t in caused.items() if k in arrived]
    await calls.run("deregister", subs.deregister, conn)
    await calls.run("close", conn.close)
    del conn
    try:
        await asyncio.wait_for(impl.drain(), 5)
    except TimeoutError:
        errors.append("drain timed out")
    pump_task.cancel()
    calls.shutdown()
    return {
        "impl": impl_name, "generated": len(caused), "delivered": len(latencies),
        "median_ms": statistics.median(latencies) if latencies else None,
        "p95_ms": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "max_ms": max(latencies) if latencies else None,
        "late_over_100ms": sum(1 for v in latencies if v > 100), "errors": errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("threadsafe", "stock"), default="threadsafe")
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--busy-threads", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a.impl, a.events, a.busy_threads), debug=True)))
