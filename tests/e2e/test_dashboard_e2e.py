"""Every PromQL query of both Grafana dashboards returns data from a real Prometheus.

The real ``virtwatch run`` watches qemu:///system with the policy engine on, two
guests doing disk and network I/O, one persistent guest that panics again and again
(so the policy restarts it: ``libvirt_domain_restarts_total`` and events exist), and a
transient directory storage pool. A real Prometheus scrapes the daemon every second and
evaluates the shipped rules (``config/prometheus/virtwatch-alerts.yml``, unchanged), so
the restarts fire ``LibvirtGuestRestarted`` and ``ALERTS`` has a firing alert. Then each
panel target (and the template variables and the annotation) of the host dashboard
(``config/grafana/virtwatch-dashboard.json``) and of the fleet dashboard
(``config/grafana/virtwatch-fleet.json``) is run against Prometheus' HTTP API with the
Grafana variables substituted, and each must return a non-empty result. Both tests share
the module's guests, daemon and Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostlib import READY_MARKER, REPO_ROOT, GuestFactory, VirtwatchProcess, free_port, open_conn
from testkit import dashboard_panels, dashboard_queries, grafana_regex, load_dashboard, substitute

RULES = REPO_ROOT / "config" / "prometheus" / "virtwatch-alerts.yml"
RATE_INTERVAL = "15s"
#: A counter series must have this many 1 s scrapes in the last 15 s for a rate over it to answer.
WARM_SAMPLES = 10
#: Grafana variables that link a data link to a result's labels.
LINK_REF = re.compile(r"\$\{__(?:data\.fields|field\.labels)\.(\w+)\}")
# Only guests of this test are managed by the policy (other vwe2e-* guests of concurrent runs are not).
LABEL_BUSY, LABEL_PANIC = "dashbusy", "dashpanic"


class PrometheusProcess:
    """A real Prometheus server in a temp dir on a free loopback port."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path] | None = None
                 ) -> None:
        self.workdir = workdir
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(p) for p in rule_files or []], "scrape_configs": scrape_configs}
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus missing: it is in .ci/apt-packages.txt")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- the child's log; closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout} s:\n{self.log_path.read_text()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{path} {params}: HTTP {err.code}: {err.read().decode()}") from None
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, expr: str, timeout: float, message: str) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"{message}: {expr} empty after {timeout} s; targets: {self.targets()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()


@pytest.fixture(scope="module")
def pool(module_guest_factory: GuestFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A transient, active directory storage pool (gone when destroyed)."""
    d = tmp_path_factory.mktemp("pool")
    name = f"vwe2e-dashpool-{module_guest_factory.run_id[-6:]}"
    module_guest_factory.conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{d}</path></target></pool>", 0)
    try:
        yield name
    finally:
        # A fresh connection: the factory's may have died with a libvirtd restart.
        conn = open_conn()
        try:
            conn.storagePoolLookupByName(name).destroy()  # transient: destroyed = gone
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
        finally:
            conn.close()


@pytest.fixture(scope="module")
def stack(module_guest_factory: GuestFactory, pool: str, tmp_path_factory: pytest.TempPathFactory):
    """Guests + virtwatch (policy on) + Prometheus scraping it; yields (daemon, prometheus, guests)."""
    # The busy guests have a guest-agent channel but run no agent: virtwatch's agent lane tries
    # them after its start and libvirt answers "agent not connected" (counted in
    # libvirt_api_errors_total), so the API errors panel has real data.
    # Balloon reports every 5 s: virtwatch drops a guest's own memory figures once its last report
    # is 3 periods old, and a TCG guest starved of CPU on a loaded 2-core CI box missed the 6 s of
    # the default period of 2 s (the 'Guest memory' panel was then empty for it). What is tested
    # here is that the panels have data; the staleness rule has its own tests.
    busy = [module_guest_factory.create(LABEL_BUSY, options={"io": 1, "net": 1}, agent=True, wait=False,
                                        balloon_period=5) for _ in range(2)]
    for g in busy:
        g.wait_for_serial(READY_MARKER)
    workdir = tmp_path_factory.mktemp("virtwatch")
    config = f"""
[log]
format = "json"
[daemon]
state_dir = "{workdir / 'state'}"
socket = "{workdir / 'virtwatch.sock'}"
[policy]
enabled = true
debounce = 0.2
[policy.defaults]
on_crash = "restart"
restart_delay = 1.0
restart_backoff = 1.0
restart_jitter = 0.0
limit_burst = 50
[[policy.match]]
glob = "vwe2e-dash*"   # this module's guests only, not other vwe2e-* guests on the host
"""
    daemon = VirtwatchProcess(workdir, config=config, poll_interval=1.0).start()
    prom = None
    try:
        # A persistent guest that panics 3 s after boot, over and over: the policy restarts it.
        panic = module_guest_factory.create(LABEL_PANIC, options={"panic": 3}, persistent=True, wait=False)
        prom = PrometheusProcess(tmp_path_factory.mktemp("prometheus"), [
            {"job_name": "virtwatch", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}],
            rule_files=[RULES]).start()
        yield daemon, prom, {"busy": busy, "panic": panic, "pool": pool}
    finally:
        if prom is not None:
            prom.stop()
        # End the crash loop the operator's way: hold the guest (no more policy actions), then
        # destroy it, so no restart is in flight at SIGTERM.
        for g in module_guest_factory.guests:
            if g.persistent:
                hold = subprocess.run([sys.executable, "-m", "virtwatch", "hold", "--socket",
                                       str(workdir / "virtwatch.sock"), g.name], capture_output=True, text=True,
                                      timeout=30)
                assert hold.returncode == 0, hold.stdout + hold.stderr
                try:
                    g.dom.destroy()
                except libvirt.libvirtError:
                    pass
        time.sleep(1)
        rc = daemon.stop()
        log = daemon.log_text()
        assert rc == 0, daemon.log_tail()
        assert "Traceback" not in log, log


CRASH_EVENTS = 'kind="lifecycle",event=~"CRASHED|STOPPED",detail=~"PANICKED|CRASHLOADED|CRASHED|FAILED"'


@pytest.fixture(scope="module")
def warm(stack) -> dict[str, Any]:
    """Waits (once for the module) until the panicking guest was restarted by the policy, the
    counters the dashboards rate, those born with its first crash and restart included, have
    WARM_SAMPLES scrapes in the last 15 s, the shipped LibvirtGuestRestarted rule fires for it, and
    the busy guests have their own memory figures.
    Returns ``instance`` (the scrape target), ``names`` (this module's guests) and ``started``."""
    daemon, prom, guests = stack
    started = time.monotonic()
    instance = f"127.0.0.1:{daemon.port}"
    panic = guests["panic"].name
    prom.wait_for(f'libvirt_domain_restarts_total{{domain="{panic}",reason="crash"}} >= 1', 60,
                  "no policy restart scraped")
    for expr in (f'count_over_time(libvirt_up{{instance="{instance}"}}[15s])',
                 f'count_over_time(libvirt_domain_restarts_total{{instance="{instance}",domain="{panic}"}}[15s])',
                 f'count_over_time(libvirt_events_total{{instance="{instance}",{CRASH_EVENTS}}}[15s])'):
        # max: one answering series gives a sum over them data (other guests of the shared host
        # may add crash series at any time).
        prom.wait_for(f"max({expr}) >= {WARM_SAMPLES}", 30, "too few scrapes")
    prom.wait_for(f'ALERTS{{alertname="LibvirtGuestRestarted",alertstate="firing",instance="{instance}",'
                  f'domain="{panic}"}}', 30, "the shipped rule LibvirtGuestRestarted does not fire")
    # The busy guests' own memory figures (a TCG guest's balloon report can lag on a loaded box:
    # virtwatch drops figures 3 periods old until the next fresh report; its rule has tests of its own).
    for g in guests["busy"]:
        prom.wait_for(f'libvirt_domain_memory_usable_bytes{{instance="{instance}",domain="{g.name}"}}', 60,
                      f"no guest memory figures of {g.name}")
    return {"instance": instance, "names": [g.name for g in guests["busy"]] + [panic], "started": started}


def label_values(prom: PrometheusProcess, definition: str, variables: dict[str, str]) -> set[str]:
    """A template variable's ``label_values(METRIC{...}, LABEL)``, answered through the series API
    as Grafana does."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(definition, variables))
    assert m, definition
    return {s[m.group(2)] for s in prom.api("series", **{"match[]": m.group(1)}) if m.group(2) in s}


def answer_all(prom: PrometheusProcess, dashboard: dict[str, Any], variables: dict[str, str]
               ) -> dict[str, list[dict[str, Any]]]:
    """Every query of ``dashboard`` run with ``variables``: where → result; fails on any empty one,
    and on a data link naming a label (``${__data.fields.X}``, ``${__field.labels.X}``) that no
    result of its panel has."""
    empty, answered = [], {}
    for where, expr in dashboard_queries(dashboard):
        q = substitute(expr, variables)
        answered[where] = prom.query(q)
        if not answered[where]:
            empty.append(f"{where}: {q}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    for p in dashboard_panels(dashboard["panels"]):
        results = [s for t in p.get("targets", []) for s in answered[f"panel {p['title']!r} target {t['refId']}"]]
        for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            for label in LINK_REF.findall(link["url"]):
                assert any(label in s["metric"] for s in results), f"{p['title']}: link {link['url']} has no {label}"
    return answered


def value_of(answered: dict[str, list[dict[str, Any]]], where: str, **labels: str) -> float:
    """The value of the first sample of ``where`` with ``labels``."""
    for s in answered[where]:
        if all(s["metric"].get(k) == v for k, v in labels.items()):
            return float(s["value"][1])
    raise AssertionError(f"{where}: no sample with {labels}: {answered[where]}")


def test_every_dashboard_query_returns_data(stack, warm) -> None:
    _daemon, prom, guests = stack
    instance, names, started = warm["instance"], warm["names"], warm["started"]
    dashboard = load_dashboard("virtwatch")
    assert dashboard["schemaVersion"] >= 36
    tvars = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert tvars["datasource"]["type"] == "datasource" and tvars["datasource"]["query"] == "prometheus"

    assert instance in label_values(prom, tvars["instance"]["definition"], {})
    domains = label_values(prom, tvars["domain"]["definition"], {"instance": grafana_regex(instance)})
    assert set(names) <= domains, (names, domains)

    variables = {"datasource": "prometheus", "instance": grafana_regex(instance),
                 "domain": "|".join(grafana_regex(n) for n in names),
                 "__rate_interval": RATE_INTERVAL, "__interval": "5s", "__range": "1m"}
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 59  # the host dashboard has 59 queries: none may go unchecked
    answered = answer_all(prom, dashboard, variables)

    def by(where: str, **labels: str) -> float:
        return value_of(answered, where, **labels)

    # Real values, not just presence.
    assert by("panel 'libvirt connection' target A") == 1
    assert by("panel 'Guests by state' target A", state="running") >= 2
    for g in guests["busy"]:
        assert by("panel 'Guest CPU' target A", domain=g.name) > 0
        assert by("panel 'Guest disk throughput' target A", domain=g.name) > 0   # reads
        assert by("panel 'Guest disk throughput' target B", domain=g.name) < 0   # writes, drawn downwards
        assert by("panel 'Guest network throughput' target A", domain=g.name) > 0
        assert by("panel 'Guest network throughput' target B", domain=g.name) < 0
        assert by("panel 'Guest memory' target B", domain=g.name) > 0
        # Issue 14: IOPS, latency, steal and NIC errors of the guests doing I/O.
        assert by("panel 'Disk IOPS' target A", domain=g.name) > 0
        assert by("panel 'Disk IOPS' target B", domain=g.name) < 0
        assert 0 < by("panel 'Disk latency' target A", domain=g.name) < 10
        assert 0 <= by("panel 'vCPU steal (delay) and wait' target A", domain=g.name) <= 1.05
        nics = [s["metric"] for s in answered["panel 'NIC errors and drops' target A"]
                if s["metric"]["domain"] == g.name]
        # Keyed by alias (or MAC), joined to libvirt_domain_interface_info: the guests' NICs are type ethernet.
        assert nics and all(m["device"] and m["type"] == "ethernet" for m in nics), nics
        assert by("panel 'NIC errors and drops' target C", domain=g.name) >= 0
    for panel in ("Top 5 by CPU", "Top 5 by memory (QEMU RSS)", "Top 5 by disk IOPS", "Top 5 by network"):
        top = answered[f"panel {panel!r} target A"]
        assert 1 <= len(top) <= 5 and max(float(s["value"][1]) for s in top) > 0, (panel, top)
    # Overcommit: at least this module's running guests over the host's CPUs and memory (virNodeGetInfo).
    conn = open_conn()
    try:
        _model, host_mib, host_cpus, *_rest = conn.getInfo()
        mine = [conn.lookupByName(n) for n in names[:2]]
        vcpus = sum(d.info()[3] for d in mine)
        max_kib = sum(d.maxMemory() for d in mine)
    finally:
        conn.close()
    assert by("panel 'vCPU overcommit' target A", instance=instance) >= vcpus / host_cpus
    assert by("panel 'Memory overcommit' target A", instance=instance) >= max_kib * 1024 / (host_mib * 2**20)
    # The firing alert's row carries what its data links need: the guest's panels, its host, the runbook.
    alerts = answered["panel 'Firing alerts' target A"]
    assert any(s["metric"]["alertname"] == "LibvirtGuestRestarted" and s["metric"].get("domain") == names[-1]
               and s["metric"]["instance"] == instance for s in alerts), alerts
    assert 0 <= by("panel 'Storage pool usage' target A", pool=guests["pool"]) <= 1
    assert by("panel 'Storage pool free' target A", pool=guests["pool"]) > 0
    assert by("panel 'Policy state' target A", domain=guests["panic"].name, managed="true") == 1
    assert by("panel 'Policy state' target B", domain=guests["panic"].name) == 0
    assert by("panel 'Policy state' target C", domain=guests["panic"].name) >= 1
    assert by("panel 'Poll duration' target B") > 0
    assert by("panel 'Host CPUs' target A") >= 1
    # The agent lane's calls to the busy guests' silent agent channels: "agent not connected".
    errors = {(s["metric"]["call"], s["metric"]["code"]) for s in answered["panel 'libvirt API errors' target A"]}
    assert any(code == "VIR_ERR_AGENT_UNRESPONSIVE" for _call, code in errors), errors
    print(f"\n{len(queries)} host dashboard queries answered; API errors seen: {sorted(errors)}; "
          f"took {time.monotonic() - started:.1f} s")
    assert time.monotonic() - started < 150


def test_every_fleet_dashboard_query_returns_data(stack, warm) -> None:
    _daemon, prom, _guests = stack
    instance, names = warm["instance"], warm["names"]
    dashboard = load_dashboard("virtwatch-fleet")
    tvars = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(tvars) == ["datasource", "instance"]
    assert instance in label_values(prom, tvars["instance"]["definition"], {})
    # Every host, as the "All" value does (allValue .+).
    variables = {"datasource": "prometheus", "instance": tvars["instance"]["allValue"],
                 "__rate_interval": RATE_INTERVAL, "__interval": "5s", "__range": "1m"}
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20
    answered = answer_all(prom, dashboard, variables)

    def by(where: str, **labels: str) -> float:
        return value_of(answered, where, **labels)

    assert by("panel 'Hosts scraped' target A") >= 1
    assert by("panel 'Hosts without libvirt' target A") == 0
    assert by("panel 'Guests' target B") >= 2
    assert by("panel 'Firing alerts' target A") >= 1
    assert by("panel 'Hosts by guest count' target A", instance=instance) >= len(names)
    assert by("panel 'Hosts' target A", instance=instance) >= len(names)
    assert by("panel 'Hosts' target B", instance=instance) >= 2
    assert by("panel 'Hosts' target C", instance=instance) > 0 and by("panel 'Hosts' target D", instance=instance) > 0
    assert by("panel 'Hosts' target F", instance=instance) == 0      # limit_burst 50: nothing given up
    assert by("panel 'Hosts' target H", instance=instance) >= 0
    assert by("panel 'vCPU overcommit per host' target A", instance=instance) > 0
    assert by("panel 'Memory overcommit per host' target A", instance=instance) > 0
    assert by("panel 'Crashes per host' target A", instance=instance) >= 0
    assert by("panel 'Policy restarts per host' target A", instance=instance, reason="crash") >= 0
    assert by("panel 'Given-up guests per host' target A", instance=instance) == 0
    assert by("panel 'Firing alerts by host' target A", instance=instance, severity="warning") >= 1
    assert any(s["metric"]["alertname"] == "LibvirtGuestRestarted" and s["metric"].get("domain") == names[-1]
               for s in answered["panel 'Firing alerts' target A"])
    print(f"\n{len(queries)} fleet dashboard queries answered")
