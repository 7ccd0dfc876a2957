"""Bounds on /metrics: the series budget's dropping order, label-value caps, series counts,
the gzip body assembled from a cached part, and the host UUID libvirt reports."""

from __future__ import annotations

import dataclasses
import gzip

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from test_metrics_mapping import build

from virtwatch.metrics.bounds import (
    MAX_LABEL_VALUE_CHARS,
    TIERS,
    cap_label_value,
    cap_labels,
    count_series,
    plan_budget,
)
from virtwatch.metrics.collector import Exposition, StateCollector
from virtwatch.metrics.gzipbody import accepts_gzip, deflate_part, gzip_body
from virtwatch.virt.host import host_uuid
from virtwatch.virt.stats import Snapshot

COUNTS = {
    "libvirt_domain_info": 50, "libvirt_domain_state_code": 50, "libvirt_domain_cpu_time_seconds_total": 50,
    "libvirt_domain_vcpu_time_seconds_total": 200, "libvirt_domain_vcpu_wait_seconds_total": 200,
    "libvirt_domain_block_read_requests_total": 100, "libvirt_domain_interface_receive_packets_total": 50,
    "libvirt_domain_block_read_bytes_total": 100, "libvirt_domain_block_info": 100, "libvirt_host_info": 1,
}


def test_tiers_name_the_families_in_their_documented_order() -> None:
    assert [name for name, _ in TIERS] == ["vcpu", "device_detail", "device"]
    vcpu, detail, device = (families for _, families in TIERS)
    assert vcpu == {"libvirt_domain_vcpu_time_seconds_total", "libvirt_domain_vcpu_wait_seconds_total",
                    "libvirt_domain_vcpu_delay_seconds_total"}
    assert "libvirt_domain_block_read_requests_total" in detail
    assert "libvirt_domain_block_flush_time_seconds_total" in detail
    assert "libvirt_domain_interface_transmit_drops_total" in detail
    assert "libvirt_domain_block_read_bytes_total" in device and "libvirt_domain_interface_info" in device
    everything = vcpu | detail | device
    assert not vcpu & detail and not detail & device
    for never in ("libvirt_domain_info", "libvirt_domain_state_code", "libvirt_host_info", "libvirt_domains",
                  "libvirt_domain_cpu_time_seconds_total", "libvirt_domain_vcpu_current"):
        assert never not in everything


def test_no_budget_or_a_budget_that_fits_drops_nothing() -> None:
    total = sum(COUNTS.values())  # 901
    assert plan_budget(COUNTS, 0, other=10).tiers == ()
    fits = plan_budget(COUNTS, total + 10, other=10)
    assert (fits.tiers, dict(fits.dropped), fits.exposed, fits.met) == ((), {}, total + 10, True)


def test_budget_drops_per_vcpu_first_then_device_detail_then_devices() -> None:
    total = sum(COUNTS.values()) + 20  # 921 with 20 series of our own
    p = plan_budget(COUNTS, total - 1, other=20)
    assert p.tiers == ("vcpu",) and dict(p.dropped) == {"libvirt_domain_vcpu_time_seconds_total": 200,
                                                        "libvirt_domain_vcpu_wait_seconds_total": 200}
    assert p.exposed == total - 400 and p.met
    p = plan_budget(COUNTS, total - 401, other=20)
    assert p.tiers == ("vcpu", "device_detail") and p.exposed == total - 550
    assert p.dropped["libvirt_domain_interface_receive_packets_total"] == 50
    p = plan_budget(COUNTS, total - 551, other=20)
    assert p.tiers == ("vcpu", "device_detail", "device") and p.exposed == 171 and p.met
    # state and identity stay even when that cannot meet the budget
    p = plan_budget(COUNTS, 100, other=20)
    assert p.tiers == ("vcpu", "device_detail", "device") and p.exposed == 171 and not p.met


def test_long_label_values_are_capped_and_stay_distinct() -> None:
    short = "vda"
    assert cap_label_value(short) == short
    a, b = "/var/lib/images/" + "x" * 300 + "-a.qcow2", "/var/lib/images/" + "x" * 300 + "-b.qcow2"
    ca, cb = cap_label_value(a), cap_label_value(b)
    assert len(ca) == len(cb) == MAX_LABEL_VALUE_CHARS and ca != cb
    assert ca.startswith("/var/lib/images/xxx") and ca[-9] == "~"
    assert cap_label_value(a) == ca  # stable across renders: the same series
    assert cap_label_value("y" * MAX_LABEL_VALUE_CHARS) == "y" * MAX_LABEL_VALUE_CHARS
    fam = GaugeMetricFamily("f", "h", labels=["domain", "path"])
    fam.add_metric(["g", a], 1)
    (out,) = cap_labels([fam])
    assert out.samples[0].labels == {"domain": "g", "path": ca}


def test_count_series_counts_sample_lines_per_family() -> None:
    text = (b"# HELP a_total x\n# TYPE a_total counter\na_total{k=\"1\"} 1\na_total{k=\"2\"} 2\n"
            b"# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n"
            b"# TYPE empty gauge\n")
    assert count_series(text) == {"a_total": 2, "h": 4, "empty": 0}


def test_gzip_body_is_one_member_of_the_cached_part_and_the_scrape_part() -> None:
    head = b"".join(b"libvirt_domain_info{domain=\"g%d\"} 1\n" % i for i in range(5000))
    tail = b"virtwatch_up 1\n"
    body = gzip_body(deflate_part(head), tail)
    assert gzip.decompress(body) == head + tail
    assert len(body) < len(head) // 5
    assert gzip.decompress(gzip_body(deflate_part(b""), tail)) == tail
    assert accepts_gzip("gzip") and accepts_gzip("deflate, gzip;q=0.5") and accepts_gzip("*")
    assert not accepts_gzip("") and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("*, gzip;q=0")


def test_exposition_applies_the_budget_counts_and_warns_once_per_change(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    holder = {"snap": snap}
    unbounded = Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {}))
    full = exposed(unbounded.render())
    vcpu = sum(n for name, n in full.items() if name.startswith("libvirt_domain_vcpu_") and "seconds" in name)
    assert vcpu > 0
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {}),
                     max_series=unbounded_total(full) - 1)
    exp.render()  # the first render learns the other collectors' series
    with capture_logs() as logs:
        holder["snap"] = _next(snap)
        text = exp.render()
        holder["snap"] = _next(holder["snap"])
        text = exp.render()
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert "libvirt_domain_vcpu_time_seconds" not in fams
    assert "libvirt_domain_block_read_bytes" in fams and "libvirt_domain_info" in fams
    dropped = {s.labels["family"]: s.value for s in fams["virtwatch_series_dropped"].samples}
    assert dropped["libvirt_domain_vcpu_time_seconds_total"] == 2 * full["libvirt_domain_vcpu_time_seconds_total"]
    assert fams["virtwatch_series_budget_tiers_dropped"].samples[0].value == 1
    total = fams["virtwatch_exposed_series"].samples[0].value
    per_family = {s.labels["family"]: s.value for s in fams["virtwatch_exposed_family_series"].samples}
    assert total == sum(per_family.values()) == unbounded_total(full) - vcpu
    assert per_family["libvirt_domain_info"] == full["libvirt_domain_info"]
    warnings = [e for e in logs if e["event"] == "series_budget_exceeded"]
    assert len(warnings) == 1 and warnings[0]["tiers_dropped"] == ["vcpu"] and warnings[0]["met"]


def exposed(text: bytes) -> dict[str, int]:
    """Series per family by exposition name (a counter's with ``_total``), read with prometheus-client's parser."""
    return {f.name + ("_total" if f.type == "counter" else ""): len(f.samples)
            for f in text_string_to_metric_families(text.decode())}


def unbounded_total(full: dict[str, int]) -> int:
    """Series of an exposition but the bounds families (as virtwatch_exposed_series counts)."""
    bounds = ("virtwatch_exposed_", "virtwatch_series_")
    return sum(n for name, n in full.items() if not name.startswith(bounds))


def _next(snap: Snapshot) -> Snapshot:
    """The same figures as the next poll's (a new render)."""
    return dataclasses.replace(snap, seq=snap.seq + 1)


def test_host_uuid_comes_from_capabilities_then_sysinfo_and_is_never_made_up() -> None:
    caps = "<capabilities><host><uuid>0F6AA0C5-2622-4fa2-9636-70e369cebca1</uuid><cpu/></host></capabilities>"
    sysinfo = ("<sysinfo type='smbios'><system><entry name='manufacturer'>X</entry>"
               "<entry name='uuid'>4c4c4544-0042-3610-8048-b4c04f4e4d32</entry></system></sysinfo>")
    assert host_uuid(caps, sysinfo) == "0f6aa0c5-2622-4fa2-9636-70e369cebca1"
    assert host_uuid("<capabilities><host><cpu/></host></capabilities>", sysinfo) == \
        "4c4c4544-0042-3610-8048-b4c04f4e4d32"
    assert host_uuid("<capabilities><host><uuid>00000000-0000-0000-0000-000000000000</uuid></host>"
                     "</capabilities>", None) == ""
    assert host_uuid("<not xml", "<sysinfo><system><entry name='uuid'>not-a-uuid</entry></system></sysinfo>") == ""
    assert host_uuid(None, None) == ""
