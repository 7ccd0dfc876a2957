"""Every metric the Grafana dashboards query is one virtwatch exports, or one Prometheus makes.

A real Daemon on libvirt's test driver (policy on, so its families render too) serves
``/metrics``; the names come from its exposition, where a family without samples still has
its ``# TYPE`` line (the per-guest vCPU delay, for one, which the test driver does not give);
the host memory families the test driver cannot give come from the code that renders them.
Series of the shipped recording rules and Prometheus' own (``ALERTS``, ``up``) count too.
Whether each query returns data is checked with QEMU guests and a real Prometheus in
tests/e2e/test_dashboard_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from testkit import DASHBOARDS, PROMETHEUS_SERIES, dashboard_queries, load_dashboard, metric_names, until
from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.metrics.domain import host_families
from virtwatch.virt.host import HostStats

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "virtwatch-alerts.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
            "info": ("_info",)}


def exported_names(exposition: str) -> set[str]:
    """Sample names of every family in a text exposition, declared (``# TYPE``) or sampled."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        out |= {fam.name + s for s in SUFFIXES.get(fam.type, ("",))}
        out |= {s.name for s in fam.samples}
    return out


async def test_dashboards_query_only_exported_metrics(event_impl: Any, make_guests: Any, tmp_path: Path) -> None:
    config = tmp_path / "virtwatch.toml"
    config.write_text(f"""
[libvirt]
uri = "test:///default"
[http]
listen = "127.0.0.1:0"
[stats]
poll_interval = 0.5
[log]
events = false
[daemon]
state_dir = "{tmp_path / 'state'}"
socket = "{tmp_path / 'virtwatch.sock'}"
[policy]
enabled = true
[[policy.match]]
glob = "vwdash-*"
mode = "dry-run"
""")
    daemon = Daemon(load_settings(config), event_impl)
    await daemon.start()
    try:
        await daemon.connection.ready.wait()
        make_guests("vwdash")
        seen = daemon.poller.latest
        await until(lambda: daemon.poller.latest is not None and daemon.poller.latest is not seen, 10, "a poll")
        assert daemon.listen_address is not None
        host, port = daemon.listen_address
        async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    finally:
        await daemon.stop()

    exported = exported_names(text)
    # Real families of every kind, seen the way the dashboards name them.
    assert {"libvirt_up", "libvirt_domain_cpu_time_seconds_total", "libvirt_poll_duration_seconds_bucket",
            "libvirt_domain_vcpu_delay_seconds_total", "libvirt_domain_restarts_total",
            "virtwatch_policy_given_up", "libvirt_domain_interface_info"} <= exported
    # The test driver refuses virNodeGetMemoryStats: its families, as a host that answers gets them.
    answered = HostStats(node_info=None, memory={"total": 4096, "free": 1024, "buffers": 64, "cached": 512},
                         cpu=None, pools=(), networks=())
    host_only = {f.name + s for f in host_families([], answered, {}) for s in SUFFIXES.get(f.type, ("",))}
    assert "libvirt_node_memory_total_bytes" in host_only - exported
    exported |= host_only
    records = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    known = exported | records | PROMETHEUS_SERIES
    used: dict[str, set[str]] = {}
    for uid in DASHBOARDS:
        for where, expr in dashboard_queries(load_dashboard(uid)):
            names = metric_names(expr)
            assert names, f"{uid} {where}: no metric in {expr}"
            for name in names:
                used.setdefault(name, set()).add(f"{uid} {where}")
    unknown = {name: sorted(w) for name, w in used.items() if name not in known}
    assert not unknown, f"dashboard queries name metrics virtwatch does not export: {unknown}"
    assert len(used) >= 40, sorted(used)
