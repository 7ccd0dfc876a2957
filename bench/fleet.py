#!/usr/bin/env python3
"""A 50-host fleet on one machine: what it costs virtwatch, Prometheus and the store.

Everything is real but the hypervisors: ``--hosts`` ``virtwatch run`` daemons, each on a
libvirt test-driver host file (``test:///…/hostNNN.xml``, generated) with ``--guests``
running guests of 2 vCPUs, 2 disks and a NIC, so each guest has per-vCPU, per-disk and
per-NIC series as on a real host. One Prometheus (replica ``a`` of ``config/fleet/``:
file_sd, external labels, remote_write) scrapes them every ``--interval`` seconds and
evaluates the shipped rules and ``config/fleet/fleet-rules.yml`` plus one bench rule;
VictoriaMetrics (shipped flags) stores what it remote-writes; an Alertmanager sends the
bench rule's alerts to a webhook receiver run by this script.

Lifecycle events: host 0 runs the living demo (``[demo]``), which pauses, shuts down or
destroys one of its guests every ``--demo-interval`` seconds and brings it back at the
next turn. The bench rule ``BenchGuestDown`` (``libvirt_domain_state_code != 1`` on host
0, ``for: 0s``) goes to the webhook through Alertmanager (``group_wait: 1s``); the latency
is from the event's time in host 0's ``/api/v1/events`` to the notification's arrival.

Prints: series per host and in total, each daemon's RSS and CPU seconds per poll,
Prometheus' scrape duration p50/p99 over every scrape of the measured window, samples
ingested per second (Prometheus' head, VictoriaMetrics' rows) and the event-to-webhook
latencies. A benchmark: it prints figures, it asserts nothing.

    python bench/fleet.py [--hosts 50] [--guests 50] [--interval 15] [--measure 240]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))  # testkit, used by hostlib

import yaml  # noqa: E402

from hostlib.fleetstack import FLEET, FleetPrometheus, VictoriaMetricsProcess, host_file_xml  # noqa: E402
from hostlib.promstack import AlertmanagerProcess, free_port, http_json, wait_until  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Webhook:
    """Alertmanager webhook receiver on 127.0.0.1: records (arrival time, alert) of every firing alert."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.time()
                with lock:
                    outer.received.extend((now, a) for a in body["alerts"] if a["status"] == "firing")
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class Host:
    """One ``virtwatch run`` on a generated test-driver host file."""

    def __init__(self, workdir: Path, index: int, guests: int, interval: float, demo_interval: float) -> None:
        self.dir = workdir / f"host{index:03d}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.instance = f"127.0.0.1:{self.port}"
        xml = host_file_xml([{"name": f"h{index:03d}-g{g:02d}", "uuid": str(uuid.uuid4()), "vcpus": 2, "disks": 2,
                              "nics": 1} for g in range(guests)])
        (self.dir / "host.xml").write_text(xml)
        demo = (f"\n[demo]\nenabled = true\nmin_interval = {demo_interval}\nmax_interval = {demo_interval}\n"
                if index == 0 else "")
        (self.dir / "virtwatch.toml").write_text(
            f'[stats]\npoll_interval = {interval}\n\n[log]\nlevel = "warning"\nevents = false\n\n'
            f'[daemon]\nstate_dir = "{self.dir / "state"}"\nsocket = "{self.dir / "vw.sock"}"\n' + demo)
        self.log = open(self.dir / "virtwatch.log", "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtwatch", "run", "--config", str(self.dir / "virtwatch.toml"),
             "--uri", f"test://{self.dir / 'host.xml'}", "--listen", self.instance],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")})

    def ready(self) -> bool:
        try:
            return http_json(f"http://{self.instance}/api/v1/status", timeout=2) is not None
        except (OSError, ValueError):
            return False

    def usage(self) -> tuple[float, int]:
        """(CPU seconds used so far, RSS bytes) of the daemon, from /proc."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK
        rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{self.proc.pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
        return cpu, rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def am_config(webhook: str) -> str:
    return yaml.safe_dump({
        "route": {"receiver": "blackhole", "group_by": ["alertname", "domain"], "group_wait": "1s",
                  "group_interval": "5s", "repeat_interval": "4h",
                  "routes": [{"matchers": ['alertname="BenchGuestDown"'], "receiver": "webhook"}]},
        "receivers": [{"name": "blackhole"}, {"name": "webhook", "webhook_configs": [{"url": webhook}]}],
    })


def bench_rule(path: Path, instance: str) -> Path:
    path.write_text(yaml.safe_dump({"groups": [{"name": "bench", "rules": [{
        "alert": "BenchGuestDown", "expr": f'libvirt_domain_state_code{{instance="{instance}"}} != 1',
        "for": "0s", "labels": {"severity": "critical"}}]}]}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--guests", type=int, default=50)
    ap.add_argument("--interval", type=float, default=15.0, help="poll and scrape interval, seconds")
    ap.add_argument("--measure", type=float, default=240.0, help="measured window, seconds")
    ap.add_argument("--demo-interval", type=float, default=40.0, help="seconds between host 0's lifecycle events")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vwbench-fleet-"))
    interval = f"{args.interval:g}s"
    webhook = Webhook()
    hosts: list[Host] = []
    servers: list[Any] = []
    try:
        vm = VictoriaMetricsProcess(tmp / "vm", {"-dedup.minScrapeInterval": interval})
        am = AlertmanagerProcess(tmp / "am", am_config(webhook.url))
        for s in (vm, am):
            servers.append(s)
            s.start()
        t0 = time.monotonic()
        hosts = [Host(tmp, i, args.guests, args.interval, args.demo_interval) for i in range(args.hosts)]
        wait_until(lambda: all(h.ready() for h in hosts), 300, "every daemon ready", interval=1.0)
        print(f"{args.hosts} daemons ready in {time.monotonic() - t0:.1f} s "
              f"({args.guests} guests each, poll every {interval})", flush=True)
        rules = [ROOT / "config" / "prometheus" / "virtwatch-alerts.yml", FLEET / "fleet-rules.yml",
                 bench_rule(tmp / "bench-rules.yml", hosts[0].instance)]
        prom = FleetPrometheus(tmp / "prometheus", "a", [h.instance for h in hosts], vm.write_url,
                               labels={"site": "bench"}, rule_files=rules, alertmanagers=[am.url], interval=interval)
        prom.config["scrape_configs"].append({"job_name": "store", "static_configs": [
            {"targets": [f"127.0.0.1:{prom.port}", f"127.0.0.1:{vm.port}"]}]})
        prom.config_path.write_text(yaml.safe_dump(prom.config, sort_keys=False))
        servers.append(prom)
        prom.start()
        wait_until(lambda: len(prom.query('up{job="virtwatch"} == 1')) == args.hosts, 120,
                   "every host scraped", interval=1.0)
        warm = 2 * args.interval + 15
        print(f"Prometheus scrapes all {args.hosts} hosts; warming up {warm:g} s, then measuring {args.measure:g} s",
              flush=True)
        time.sleep(warm)
        before = {h.instance: (h.usage(), polls(h)) for h in hosts}
        start = time.time()
        time.sleep(args.measure)
        end = time.time()
        after = {h.instance: (h.usage(), polls(h)) for h in hosts}
        report(args, prom, vm, hosts, before, after, start, end, webhook)
    finally:
        for h in hosts:
            h.stop()
        for s in reversed(servers):
            s.stop()
        webhook.close()
        print(f"(work directory: {tmp})")


def polls(h: Host) -> float:
    """Polls the daemon has done (its libvirt_poll_duration_seconds_count)."""
    with urllib.request.urlopen(f"http://{h.instance}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("libvirt_poll_duration_seconds_count"):
                return float(line.split()[-1])
    return 0.0


def report(args: argparse.Namespace, prom: FleetPrometheus, vm: VictoriaMetricsProcess, hosts: list[Host],
           before: dict[str, Any], after: dict[str, Any], start: float, end: float, webhook: Webhook) -> None:
    window = f"{int(end - start)}s"
    print("\n== series")
    per_host = {r["metric"]["instance"]: float(r["value"][1])
                for r in prom.query('scrape_samples_scraped{job="virtwatch"}')}
    exposed = {r["metric"]["instance"]: float(r["value"][1]) for r in prom.query("virtwatch_exposed_series")}
    vals = sorted(per_host.values())
    print(f"per host (samples per scrape): min {vals[0]:.0f}, median {statistics.median(vals):.0f}, max {vals[-1]:.0f}"
          f"; virtwatch_exposed_series median {statistics.median(exposed.values()):.0f}")
    print(f"total over {len(vals)} hosts: {sum(vals):.0f}; "
          f"Prometheus head series: {float(prom.query('prometheus_tsdb_head_series')[0]['value'][1]):.0f}")
    print("\n== each daemon: RSS, CPU per poll")
    rows = []
    for h in hosts:
        (cpu0, _), p0 = before[h.instance]
        (cpu1, rss), p1 = after[h.instance]
        per_poll = (cpu1 - cpu0) / (p1 - p0) if p1 > p0 else float("nan")
        rows.append((h.instance, rss / 2**20, per_poll, p1 - p0, (cpu1 - cpu0) / (end - start)))
    for i, (inst, rss, per_poll, n, share) in enumerate(rows):
        print(f"host{i:03d} {inst}: RSS {rss:6.1f} MiB, CPU {per_poll * 1000:6.1f} ms/poll "
              f"({n:.0f} polls, {share * 100:.2f} % of a core)")
    print(f"RSS MiB: median {statistics.median(r[1] for r in rows):.1f}, max {max(r[1] for r in rows):.1f}; "
          f"CPU ms/poll: median {statistics.median(r[2] for r in rows) * 1000:.1f}, "
          f"max {max(r[2] for r in rows) * 1000:.1f}; "
          f"sum of daemons: {sum(r[4] for r in rows) * 100:.1f} % of a core")
    print("\n== Prometheus scrapes of the fleet")
    data = prom.api("query_range", query='scrape_duration_seconds{job="virtwatch"}', start=str(start), end=str(end),
                    step=f"{args.interval:g}")
    durations = [float(v[1]) for s in data["result"] for v in s["values"]]
    print(f"scrape duration over {len(durations)} scrapes: p50 {pct(durations, 50) * 1000:.1f} ms, "
          f"p99 {pct(durations, 99) * 1000:.1f} ms, max {max(durations) * 1000:.1f} ms")
    ingest = prom.query(f"rate(prometheus_tsdb_head_samples_appended_total[{window}])")
    rows_in = prom.query(f"sum(rate(vm_rows_inserted_total[{window}]))")
    cpu = prom.query(f'rate(process_cpu_seconds_total{{job="store"}}[{window}])')
    rss = prom.query('process_resident_memory_bytes{job="store"}')
    print(f"ingestion: Prometheus {float(ingest[0]['value'][1]):.0f} samples/s; "
          f"VictoriaMetrics {float(rows_in[0]['value'][1]) if rows_in else float('nan'):.0f} rows/s")
    for r in cpu:
        mem = next((float(m["value"][1]) for m in rss if m["metric"]["instance"] == r["metric"]["instance"]), 0.0)
        name = "Prometheus" if r["metric"]["instance"].endswith(f":{prom.port}") else "VictoriaMetrics"
        print(f"{name}: {float(r['value'][1]) * 100:.1f} % of a core, RSS {mem / 2**20:.0f} MiB")
    print("\n== lifecycle event on host 0 -> webhook notification (Prometheus rule, Alertmanager)")
    events = http_json(f"http://{hosts[0].instance}/api/v1/events", {"limit": "1000"})["events"]
    downs = [e for e in events if e["kind"] == "lifecycle" and e["event"] in ("SUSPENDED", "STOPPED")]
    latencies = []
    for arrived, alert in webhook.received:
        domain = alert["labels"].get("domain", "")
        cause = [e for e in downs if e["name"] == domain and e["time"] <= arrived]
        if cause:
            latencies.append(arrived - cause[-1]["time"])
            print(f"  {domain}: {cause[-1]['event']}/{cause[-1]['detail']} -> webhook {latencies[-1]:.1f} s")
    if latencies:
        print(f"latency: median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s "
              f"(scrape {args.interval:g} s + evaluation {args.interval:g} s + group_wait 1 s bound it)")
    else:
        print("no notification arrived in the window")


if __name__ == "__main__":
    main()
