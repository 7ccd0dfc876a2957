"""A fleet's store end to end: two Prometheus replicas remote-write into one VictoriaMetrics.

Real components, all on 127.0.0.1:

- host A: ``virtwatch run`` on the system libvirtd with a real QEMU guest;
- host B: ``virtwatch run`` on a libvirt test-driver host file that defines a running guest
  with the *same UUID* (a guest started on a second hypervisor while it still runs on the
  first), started half-way through the test;
- the HA pair of ``config/fleet/prometheus-{a,b}.yml`` (file_sd targets, external labels,
  remote_write), scraping every 2 s and evaluating ``config/fleet/fleet-rules.yml``
  (``for:`` shortened to 1 s);
- VictoriaMetrics with the flags of ``config/fleet/victoria-metrics.default`` (the shipped
  relabeling drops ``replica``; ``-dedup.minScrapeInterval`` is set to the 2 s scrape interval
  and ``-search.latencyOffset`` to 1 s so fresh samples are visible at once).

Asserted: the guest's CPU series in VictoriaMetrics is one series (no ``replica``), carries
the host identity of ``libvirt_host_info`` through the documented join, and holds one sample
per scrape interval, not two; the split-brain rule is silent with one host and fires for the
guest's UUID once host B runs it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hostlib.daemon import VirtwatchProcess
from hostlib.fleetstack import FLEET, FleetPrometheus, VictoriaMetricsProcess, host_file_xml
from hostlib.guests import Guest, GuestFactory
from hostlib.promstack import rules_with_short_for, wait_until
from virtwatch.virt.host import read_host_uuid

pytestmark = pytest.mark.e2e

INTERVAL = 2.0  # seconds: scrape and evaluation interval of the pair, VictoriaMetrics' dedup interval


def vw_config(workdir: Path) -> str:
    return f"""
[log]
events = false

[daemon]
state_dir = "{workdir / 'state'}"
socket = "{workdir / 'virtwatch.sock'}"
shutdown_timeout = 10.0
"""


@dataclasses.dataclass
class Fleet:
    guest: Guest
    uuid: str
    host_uuid: str
    a: VirtwatchProcess
    b: VirtwatchProcess
    vm: VictoriaMetricsProcess
    pair: tuple[FleetPrometheus, FleetPrometheus]

    @property
    def instance_a(self) -> str:
        return f"127.0.0.1:{self.a.port}"

    @property
    def instance_b(self) -> str:
        return f"127.0.0.1:{self.b.port}"

    def diag(self) -> str:
        return (f"--- victoria-metrics\n{self.vm.log_text()[-1500:]}\n--- prometheus a\n"
                f"{self.pair[0].log_text()[-1500:]}\n--- virtwatch b\n{self.b.log_tail(20)}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, module_guest_factory: GuestFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleetstore")
    guest = module_guest_factory.create("fleetstore")
    uuid = guest.dom.UUIDString()
    conn = libvirt.openReadOnly("qemu:///system")
    try:
        host_uuid = read_host_uuid(conn)
    finally:
        conn.close()
    host_b = tmp / "host-b.xml"
    host_b.write_text(host_file_xml([{"name": guest.name, "uuid": uuid, "vcpus": 1},
                                           {"name": "other", "uuid": "0a0b0c0d-0000-4000-8000-00000000000b"}]))
    a = VirtwatchProcess(tmp / "a", uri="qemu:///system", poll_interval=1.0)
    a.config_path.write_text(vw_config(a.workdir))
    b = VirtwatchProcess(tmp / "b", uri=f"test://{host_b}", poll_interval=1.0)
    b.config_path.write_text(vw_config(b.workdir))
    vm = VictoriaMetricsProcess(tmp / "vm", {"-dedup.minScrapeInterval": f"{INTERVAL:g}s",
                                             "-search.latencyOffset": "1s", "-search.disableCache": "true"})
    rules = tmp / "fleet-rules.short-for.yml"
    rules_with_short_for(FLEET / "fleet-rules.yml", rules, "1s")
    pair: list[FleetPrometheus] = []
    try:
        vm.start()
        a.start()
        for replica in ("a", "b"):
            prom = FleetPrometheus(tmp / f"prometheus-{replica}", replica, [f"127.0.0.1:{a.port}"], vm.write_url,
                                   labels={"site": "e2e"}, rule_files=[rules], interval=f"{INTERVAL:g}s")
            pair.append(prom)
            prom.start()
        yield Fleet(guest, uuid, host_uuid, a, b, vm, (pair[0], pair[1]))
    finally:
        for prom in pair:
            prom.stop()
        codes = [p.stop() for p in (b, a)]
        vm.stop()
        assert codes == [0, 0], a.log_tail() + b.log_tail()


def test_the_pair_is_stored_once_with_the_host_identity(fleet: Fleet) -> None:
    vm, name = fleet.vm, fleet.guest.name
    cpu = f'libvirt_domain_cpu_time_seconds_total{{domain="{name}"}}'
    # Both replicas write: the target is up in each, and the store has samples from them.
    for prom in fleet.pair:
        wait_until(lambda p=prom: p.query(f'up{{instance="{fleet.instance_a}"}} == 1'), 30,
                   f"host A scraped by {prom.config['global']['external_labels']['replica']}", detail=fleet.diag)
    [series] = wait_until(lambda: vm.query(cpu), 60, "the guest's CPU series in VictoriaMetrics", detail=fleet.diag)
    labels = series["metric"]
    assert "replica" not in labels  # the shipped relabeling dropped it: one series for the pair
    assert labels["cluster"] == "fleet1" and labels["site"] == "e2e" and labels["instance"] == fleet.instance_a
    assert labels["job"] == "virtwatch" and float(series["value"][1]) > 0

    # The documented join names the host: libvirt's own UUID, not one we made up.
    joined = vm.query(f"{cpu} * on (instance, job) group_left (hostname, host_uuid, libvirt_version, hypervisor, "
                      f"hypervisor_version) libvirt_host_info")
    assert len(joined) == 1
    identity = joined[0]["metric"]
    assert identity["host_uuid"] == fleet.host_uuid and len(fleet.host_uuid) == 36
    assert identity["hypervisor"] == "QEMU" and identity["hostname"] and identity["libvirt_version"].count(".") == 2
    [info] = vm.query(f'libvirt_domain_info{{domain="{name}"}}')
    assert info["metric"]["uuid"] == fleet.uuid

    # Deduplicated samples: one per 2 s interval over 20 s (about 10), where the two replicas
    # wrote about 20. Waits until the window is full of samples from both replicas.
    for prom in fleet.pair:
        wait_until(lambda p=prom: p.query(f"count_over_time({cpu}[20s]) >= 9"), 60, "20 s of scrapes")
    [window] = vm.query(f"count_over_time({cpu}[20s])")
    assert 5 <= float(window["value"][1]) <= 14, window


def test_the_split_brain_rule_fires_when_a_second_host_runs_the_same_uuid(fleet: Fleet) -> None:
    prom_a, prom_b = fleet.pair
    # One host: the rule is loaded, healthy and silent.
    wait_until(lambda: prom_a.query("count(libvirt_domain_info)"), 30, "guests in Prometheus")

    def rule_health() -> list[str]:
        return [r["health"] for g in prom_a.rule_groups() for r in g["rules"] if r["name"] == "LibvirtGuestSplitBrain"]

    wait_until(lambda: rule_health() == ["ok"], 20, "split-brain rule evaluated")
    assert not [a for a in prom_a.alerts() if a["labels"]["alertname"] == "LibvirtGuestSplitBrain"]

    # Host B starts, running a guest with the same UUID; both replicas scrape it.
    fleet.b.start()
    for prom in fleet.pair:
        prom.set_targets([fleet.instance_a, fleet.instance_b], {"site": "e2e"})

    def firing(prom: FleetPrometheus) -> list[dict]:
        return [a for a in prom.alerts() if a["labels"]["alertname"] == "LibvirtGuestSplitBrain"
                and a["state"] == "firing"]

    for prom in (prom_a, prom_b):
        [alert] = wait_until(lambda p=prom: firing(p), 60, "LibvirtGuestSplitBrain firing", detail=fleet.diag)
        assert alert["labels"]["uuid"] == fleet.uuid and alert["labels"]["severity"] == "critical"
        assert alert["value"] in ("2e+00", "2")
        assert "runs on 2 hosts" in alert["annotations"]["summary"]
    # The store sees both hosts' series for the one UUID, told apart by their identity.
    expr = (f'libvirt_domain_info{{uuid="{fleet.uuid}"}} * on (instance, job) group_left (host_uuid, hypervisor) '
            f"libvirt_host_info")
    hosts = wait_until(lambda: len(fleet.vm.query(expr)) == 2 and fleet.vm.query(expr), 30, "both hosts in the store")
    seen = sorted((h["metric"]["instance"], h["metric"]["hypervisor"], h["metric"].get("host_uuid", "")) for h in hosts)
    assert seen == sorted([(fleet.instance_a, "QEMU", fleet.host_uuid), (fleet.instance_b, "TEST", "")])  # "": none
