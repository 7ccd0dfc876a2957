"""Stats → metrics mapping, from real recorded getAllDomainStats output."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from virtwatch.metrics.collector import Exposition, StateCollector
from virtwatch.state import GuestRegistry, ResyncEntry
from virtwatch.virt.devices import parse_devices
from virtwatch.virt.stats import DomainStats, HostStats, NetworkInfo, PoolInfo, Snapshot


def live_xml(stats: dict) -> str:
    """The live XML libvirt 9.0 gives a running QEMU guest whose NIC is tap ``net.0.name``
    (``<interface type='ethernet'>`` as the recorded guests had; libvirt adds MAC, tap and alias)."""
    nics = "".join(f"<interface type='ethernet'><mac address='52:54:00:00:00:{i:02x}'/>"
                   f"<target dev='{stats[f'net.{i}.name']}' managed='yes'/><model type='virtio'/>"
                   f"<alias name='net{i}'/></interface>" for i in range(stats.get("net.count", 0)))
    return f"<domain type='qemu'><devices>{nics}<memballoon model='virtio'><stats period='2'/>" \
           "</memballoon></devices></domain>"


def build(recorded: dict, stale: set[str] = frozenset()) -> tuple[GuestRegistry, Snapshot]:
    reg = GuestRegistry(clock=lambda: 0.0)
    entries, domains = [], {}
    for d in recorded["domains"]:
        st = d["stats"]
        entries.append(ResyncEntry(d["name"], d["uuid"], st["state.state"], st["state.reason"], True, False))
        # a stale guest's figures are the ones it gave 12.5 s before this poll
        domains[d["uuid"]] = DomainStats(d["name"], d["uuid"], st, d["name"] in stale,
                                         87.5 if d["name"] in stale else 100.0, devices=parse_devices(live_xml(st)))
    reg.apply_resync(entries, started_after_seq=0)
    host = HostStats(node_info=("x86_64", 24000, 2, 2400, 1, 1, 2, 1), memory={"total": 1024, "free": 512},
                     cpu={"kernel": 2_000_000_000, "user": 1_000_000_000, "idle": 5, "iowait": 0},
                     pools=(PoolInfo("default", "p-uuid", 2, 1000, 400, 600, True),
                            PoolInfo("off", "p2", 0, 0, 0, 0, False)),
                     networks=(NetworkInfo("default", "n1", True), NetworkInfo("iso", "n2", False)),
                     collected_at=99.5)
    return reg, Snapshot(seq=1, time=100.0, duration=0.01, domains=domains, host=host)


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def render(reg: GuestRegistry, snap: Snapshot) -> bytes:
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: snap, lambda: {"libvirt_version": "9.0.0",
                                                                                     "driver": "QEMU"}))
    return exp.render()


def test_units_and_values_for_a_running_guest(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    s = samples(render(reg, snap))
    b01 = next(d for d in recorded_domstats["domains"] if d["name"] == "b01")["stats"]
    dom = (("domain", "b01"),)
    assert s[("libvirt_domain_cpu_time_seconds_total", dom)] == pytest.approx(b01["cpu.time"] / 1e9)
    assert s[("libvirt_domain_cpu_user_seconds_total", dom)] == pytest.approx(b01["cpu.user"] / 1e9)
    assert s[("libvirt_domain_memory_usable_bytes", dom)] == b01["balloon.usable"] * 1024
    assert s[("libvirt_domain_memory_available_bytes", dom)] == b01["balloon.available"] * 1024
    assert s[("libvirt_domain_memory_rss_bytes", dom)] == b01["balloon.rss"] * 1024
    assert s[("libvirt_domain_memory_minor_faults_total", dom)] == b01["balloon.minor_fault"]
    vda = (("domain", "b01"), ("target", "vda"))
    assert s[("libvirt_domain_block_read_bytes_total", vda)] == b01["block.0.rd.bytes"]
    assert s[("libvirt_domain_block_write_time_seconds_total", vda)] == pytest.approx(b01["block.0.wr.times"] / 1e9)
    assert s[("libvirt_domain_block_capacity_bytes", vda)] == b01["block.0.capacity"]
    net = (("device", "net0"), ("domain", "b01"))  # the alias, not the tap (vnet8)
    assert s[("libvirt_domain_interface_transmit_bytes_total", net)] == b01["net.0.tx.bytes"]
    assert s[("libvirt_domain_interface_receive_packets_total", net)] == b01["net.0.rx.pkts"]
    nic_info = (("bridge", ""), ("device", "net0"), ("domain", "b01"), ("mac", "52:54:00:00:00:00"),
                ("model", "virtio"), ("source", ""), ("target", "vnet8"), ("type", "ethernet"))
    assert s[("libvirt_domain_interface_info", nic_info)] == 1
    assert not [k for k in s if k[0].startswith("libvirt_domain_interface") and ("target", "vnet8") in k[1]
                and k[0] != "libvirt_domain_interface_info"]
    vcpu0 = (("domain", "b01"), ("vcpu", "0"))
    assert s[("libvirt_domain_vcpu_delay_seconds_total", vcpu0)] == pytest.approx(b01["vcpu.0.delay"] / 1e9)
    assert s[("libvirt_domain_state_code", dom)] == 1
    assert s[("libvirt_domain_stats_stale", dom)] == 0


def test_missing_fields_give_no_sample_never_zero(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    s = samples(render(reg, snap))
    # ev-panic is shut off: libvirt returned no balloon guest stats, no block rd/wr, no net, no vcpu times
    dom = (("domain", "ev-panic"),)
    assert ("libvirt_domain_memory_usable_bytes", dom) not in s
    assert ("libvirt_domain_block_read_bytes_total", (("domain", "ev-panic"), ("target", "vda"))) not in s
    assert ("libvirt_domain_vcpu_time_seconds_total", (("domain", "ev-panic"), ("vcpu", "0"))) not in s
    assert s[("libvirt_domain_cpu_time_seconds_total", dom)] == pytest.approx(11.93)
    assert s[("libvirt_domain_block_capacity_bytes", (("domain", "ev-panic"), ("target", "vda")))] == 67108864
    assert s[("libvirt_domain_state_code", dom)] == 5


def test_paused_on_io_error_and_host_figures(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats, stale={"b02"})
    s = samples(render(reg, snap))
    assert s[("libvirt_domain_state_code", (("domain", "ioerr"),))] == 3
    assert s[("libvirt_domain_state_reason_code", (("domain", "ioerr"),))] == 5  # VIR_DOMAIN_PAUSED_IOERROR
    assert s[("libvirt_domain_stats_stale", (("domain", "b02"),))] == 1
    assert s[("libvirt_domain_stats_age_seconds", (("domain", "b02"),))] == 12.5
    assert s[("libvirt_domain_stats_age_seconds", (("domain", "ioerr"),))] == 0.0
    assert s[("libvirt_host_stats_timestamp_seconds", ())] == 99.5
    assert s[("libvirt_domains", (("state", "running"),))] == 20
    assert s[("libvirt_domains", (("state", "shutoff"),))] == 4
    assert s[("libvirt_node_cpus", ())] == 2
    assert s[("libvirt_node_memory_bytes", ())] == 24000 * 1024 * 1024
    assert s[("libvirt_node_memory_free_bytes", ())] == 512 * 1024
    assert s[("libvirt_node_cpu_kernel_seconds_total", ())] == 2.0
    assert s[("libvirt_storage_pool_allocation_bytes", (("pool", "default"),))] == 400
    assert ("libvirt_storage_pool_allocation_bytes", (("pool", "off"),)) not in s  # inactive pool: no sizes
    assert s[("libvirt_storage_pool_state", (("pool", "off"),))] == 0
    assert s[("libvirt_network_active", (("network", "iso"),))] == 0
    assert s[("libvirt_version_info", (("driver", "QEMU"), ("hypervisor", ""), ("libvirt", "9.0.0")))] == 1


def test_nic_series_need_the_xml_and_survive_a_new_tap(recorded_domstats: dict) -> None:
    """A restart gives the NIC a new tap: the same series (device net0) goes on, only the
    info's target changes; a guest whose XML was not read gets no NIC sample at all."""
    reg, snap = build(recorded_domstats)
    b01 = next(d for d in recorded_domstats["domains"] if d["name"] == "b01")
    restarted = {**b01["stats"], "net.0.name": "vnet31", "net.0.rx.bytes": 12}
    b10 = next(d for d in recorded_domstats["domains"] if d["name"] == "b10")
    domains = dict(snap.domains)
    domains[b01["uuid"]] = DomainStats("b01", b01["uuid"], restarted, False, 100.0,
                                       devices=parse_devices(live_xml(restarted)))
    domains[b10["uuid"]] = DomainStats("b10", b10["uuid"], b10["stats"], False, 100.0, devices=None)
    s = samples(render(reg, Snapshot(seq=2, time=100.0, duration=0.01, domains=domains, host=None)))
    rx = [(k[1], v) for k, v in s.items() if k[0] == "libvirt_domain_interface_receive_bytes_total"
          and ("domain", "b01") in k[1]]
    assert rx == [((("device", "net0"), ("domain", "b01")), 12)]
    info = [dict(k[1]) for k in s if k[0] == "libvirt_domain_interface_info" and ("domain", "b01") in k[1]]
    assert [(i["device"], i["target"]) for i in info] == [("net0", "vnet31")]
    assert not [k for k in s if k[0].startswith("libvirt_domain_interface") and ("domain", "b10") in k[1]]


def test_memory_stats_stale_flag_and_dropped_figures(recorded_domstats: dict) -> None:
    from virtwatch.virt.devices import without_guest_memory

    reg, snap = build(recorded_domstats)
    b01 = next(d for d in recorded_domstats["domains"] if d["name"] == "b01")
    b10 = next(d for d in recorded_domstats["domains"] if d["name"] == "b10")
    domains = dict(snap.domains)
    # as the poller leaves them: b01's last report too old (figures dropped), b10's current
    domains[b01["uuid"]] = DomainStats("b01", b01["uuid"], without_guest_memory(b01["stats"]), False, 100.0,
                                       memory_stale=True)
    domains[b10["uuid"]] = DomainStats("b10", b10["uuid"], b10["stats"], False, 100.0, memory_stale=False)
    s = samples(render(reg, Snapshot(seq=2, time=100.0, duration=0.01, domains=domains, host=None)))
    b01d, b10d = (("domain", "b01"),), (("domain", "b10"),)
    assert s[("libvirt_domain_memory_stats_stale", b01d)] == 1
    assert s[("libvirt_domain_memory_stats_stale", b10d)] == 0
    assert ("libvirt_domain_memory_stats_stale", (("domain", "b02"),)) not in s  # not judged: no sample
    for name in ("usable", "available", "unused", "disk_caches"):
        assert (f"libvirt_domain_memory_{name}_bytes", b01d) not in s
        assert s[(f"libvirt_domain_memory_{name}_bytes", b10d)] == b10["stats"][f"balloon.{name}"] * 1024
    for name in ("swap_in_bytes", "swap_out_bytes", "major_faults", "minor_faults"):
        assert (f"libvirt_domain_memory_{name}_total", b01d) not in s
    assert s[("libvirt_domain_memory_balloon_current_bytes", b01d)] == b01["stats"]["balloon.current"] * 1024
    assert s[("libvirt_domain_memory_rss_bytes", b01d)] == b01["stats"]["balloon.rss"] * 1024
    assert s[("libvirt_domain_memory_stats_last_update_timestamp_seconds", b01d)] == \
        b01["stats"]["balloon.last-update"]


def test_vanished_guest_vanishes_from_metrics(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    keep = [ResyncEntry(d["name"], d["uuid"], 1, 1, True, False) for d in recorded_domstats["domains"]
            if d["name"] != "b01"]
    reg.apply_resync(keep, started_after_seq=0)
    text = render(reg, snap).decode()
    assert 'domain="b01"' not in text
    assert 'domain="b02"' in text


def test_render_is_cached_until_state_or_snapshot_changes(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    holder = {"snap": snap}
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {}))
    first = exp.render()
    assert exp.render() == first and exp.renders == 1
    holder["snap"] = Snapshot(seq=2, time=101.0, duration=0.01, domains=snap.domains, host=None)
    exp.render()
    assert exp.renders == 2


def test_a_render_after_changed_host_figures_writes_what_a_first_render_writes(recorded_domstats: dict) -> None:
    """The host families' text is reused from the render before only where it is unchanged."""
    reg, snap = build(recorded_domstats)
    holder = {"snap": snap}
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {}))
    before = exp.render()
    assert b"libvirt_node_memory_free_bytes 524288.0" in before
    changed = dataclasses.replace(snap.host, memory={"total": 1024, "free": 256}, collected_at=100.5)
    holder["snap"] = dataclasses.replace(snap, seq=2, time=101.0, host=changed)
    again = exp.render()
    assert exp.renders == 2
    assert b"libvirt_node_memory_free_bytes 262144.0" in again
    assert again == Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {})).render()


def test_promtool_accepts_the_exposition(recorded_domstats: dict) -> None:
    reg, snap = build(recorded_domstats)
    live = CollectorRegistry()
    from virtwatch.metrics.instruments import Instruments
    Instruments(live).events.labels(kind="lifecycle", event="STOPPED", detail="CRASHED").inc()
    body = generate_latest(live) + render(reg, snap)
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


async def test_render_async_matches_render_and_shares_one_render(recorded_domstats: dict) -> None:
    import asyncio

    reg, snap = build(recorded_domstats)
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: snap, lambda: {}))
    bodies = await asyncio.gather(*(exp.render_async() for _ in range(5)))
    assert exp.renders == 1
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0] == exp.render()
    assert exp.renders == 1  # the sync path reuses the cached state text


async def test_a_scrape_never_waits_and_says_when_it_is_one_render_behind(recorded_domstats: dict) -> None:

    reg, snap = build(recorded_domstats)
    holder = {"snap": snap}
    exp = Exposition(CollectorRegistry(), StateCollector(reg, lambda: holder["snap"], lambda: {}))
    first = await exp.render_async()  # nothing cached: the first scrape waits
    assert exp.answered_behind is False and exp.renders == 1
    one = next(iter(snap.domains.values()))
    changed = dict(one.stats, **{"cpu.time": one.stats["cpu.time"] + 10**9})
    holder["snap"] = dataclasses.replace(snap, seq=snap.seq + 1,
                                         domains={**snap.domains, one.uuid: dataclasses.replace(one, stats=changed)})
    behind = await exp.render_async()  # the state changed: the cached body, and a render started
    assert behind == first and exp.answered_behind is True
    assert exp.rendering is not None
    await exp.rendering  # the render the scrape started
    now = await exp.render_async()
    assert exp.answered_behind is False and exp.renders == 2
    assert now != first and now == exp.render()
    line = f'libvirt_domain_cpu_time_seconds_total{{domain="{one.name}"}}'
    assert line.encode() in now and line.encode() in first
    value = next(ln for ln in now.decode().splitlines() if ln.startswith(line)).split()[-1]
    assert float(value) == pytest.approx(changed["cpu.time"] / 1e9)
