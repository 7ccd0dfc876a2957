"""virtwatch against a real libvirtd with real QEMU guests, scraped for real.

One daemon (the real ``virtwatch run`` command) watches qemu:///system while
guests do disk and network I/O, panic, and get destroyed; every assertion
comes from an HTTP scrape of that daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostlib import READY_MARKER, START_SCRIPT, GuestFactory, VirtwatchProcess, sample


@pytest.fixture(scope="module")
def busy(module_guest_factory: GuestFactory):
    """Two guests writing/reading their disk and sending ARP traffic."""
    guests = [module_guest_factory.create("busy", options={"io": 1, "net": 1}, wait=False) for _ in range(2)]
    for g in guests:
        g.wait_for_serial(READY_MARKER)
    return guests


#: A second NIC with a user alias (libvirt keeps ``ua-*`` aliases across starts); a plain tap, no address.
SECOND_NIC = "<interface type='ethernet'><alias name='ua-mgmt'/><model type='virtio'/></interface>"


@pytest.fixture(scope="module")
def nics(module_guest_factory: GuestFactory):
    """A persistent guest (so it can be started again) with two NICs, sending ARP on the
    first, and a virtio balloon with ``<stats period='2'/>``."""
    g = module_guest_factory.create("nics", options={"net": 1}, persistent=True, wait=False,
                                    extra_devices=SECOND_NIC)
    g.wait_for_serial(READY_MARKER)
    return g


def _series(text: str, name: str, domain: str) -> list[dict[str, str]]:
    """Label sets of every sample ``name`` of guest ``domain`` in exposition ``text``."""
    return [dict(s.labels) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and s.labels.get("domain") == domain]


def _live_nics(dom: libvirt.virDomain) -> dict[str, str]:
    """{alias: tap} of the guest's live XML."""
    import xml.etree.ElementTree as ET

    out = {}
    for el in ET.fromstring(dom.XMLDesc(0)).findall("./devices/interface"):
        alias, target = el.find("alias"), el.find("target")
        out[alias.get("name") if alias is not None else ""] = target.get("dev") if target is not None else ""
    return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busy) -> Iterator[VirtwatchProcess]:
    proc = VirtwatchProcess(tmp_path_factory.mktemp("virtwatch"), poll_interval=1.0).start()
    try:
        yield proc
    finally:
        rc = proc.stop()
        log = proc.log_text()
        assert rc == 0, proc.log_tail()
        assert "Event loop is closed" not in log
        assert "Traceback" not in log, log


def test_stop_releases_every_libvirt_callback(busy, tmp_path: Path) -> None:
    """A stop on a healthy host is prompt: every connection's socket handle and keepalive
    timer is released before the drain. With the guest agent on a read-only connection,
    each refused agentSetResponseTimeout left a virDomain in a traceback cycle, so the
    drain waited out its 2 s at every stop (``shutdown_drain_timeout``, 5 of 5 stops)."""
    times = []
    for i in range(3):
        vw = VirtwatchProcess(tmp_path / str(i), config=(
            f"[daemon]\nstate_dir = \"{tmp_path / str(i)}\"\nsocket = \"{tmp_path / str(i) / 'vw.sock'}\"\n"),
            poll_interval=1.0).start()
        vw.wait_until(lambda vw=vw: "agent_denied_read_only" in vw.log_text(), 10, "the agent never tried")
        time.sleep(1.0)
        t0 = time.monotonic()
        assert vw.stop() == 0, vw.log_tail()
        times.append(time.monotonic() - t0)
        assert "shutdown_drain_timeout" not in vw.log_text(), vw.log_tail()
    print(f"\nstop with the agent denied on a read-only connection: {', '.join(f'{t:.2f}' for t in times)} s")
    assert max(times) < 1.5


def test_counters_grow_between_polls(daemon: VirtwatchProcess, busy) -> None:
    names = [g.name for g in busy]
    keys = [("libvirt_domain_block_read_bytes_total", {"target": "vda"}),
            ("libvirt_domain_block_write_bytes_total", {"target": "vda"}),
            ("libvirt_domain_interface_receive_bytes_total", {}),
            ("libvirt_domain_interface_transmit_bytes_total", {}),
            ("libvirt_domain_cpu_time_seconds_total", {})]

    def values() -> dict:
        text = daemon.scrape()
        return {(n, k): sample(text, k, domain=n, **lab) for n in names for k, lab in keys}

    daemon.wait_until(lambda: all(v is not None for v in values().values()), 20, "guest counters never appeared")
    first = values()
    time.sleep(4)  # several polls at 1 s
    second = values()
    for key, v in first.items():
        assert second[key] > v, f"{key} did not grow: {v} -> {second[key]}"
    text = daemon.scrape()
    for n in names:
        assert sample(text, "libvirt_domain_memory_usable_bytes", domain=n) > 0
        assert sample(text, "libvirt_domain_memory_available_bytes", domain=n) > 0
        assert sample(text, "libvirt_domain_state_code", domain=n) == 1
        assert sample(text, "libvirt_domain_stats_stale", domain=n) == 0
    assert sample(text, "libvirt_up") == 1
    assert sample(text, "libvirt_version_info", libvirt="9.0.0") == 1


def test_panic_and_destroy_events_are_counted(daemon: VirtwatchProcess, module_guest_factory: GuestFactory) -> None:
    def count(event: str, detail: str) -> float:
        return sample(daemon.scrape(), "libvirt_events_total", kind="lifecycle", event=event, detail=detail) or 0.0

    crashed0, stopped0, destroyed0 = count("CRASHED", "PANICKED"), count("STOPPED", "CRASHED"), \
        count("STOPPED", "DESTROYED")
    panic = module_guest_factory.create("panic", options={"panic": 2}, persistent=True, wait=False)
    victim = module_guest_factory.create("victim", wait=True)
    panic.wait_for_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, timeout=60)
    daemon.wait_until(lambda: count("STOPPED", "CRASHED") >= stopped0 + 1, 10, "STOPPED/CRASHED not counted")
    assert count("CRASHED", "PANICKED") >= crashed0 + 1
    text = daemon.scrape()
    assert sample(text, "libvirt_domain_state_code", domain=panic.name) == 5
    assert sample(text, "libvirt_domain_state_reason_code", domain=panic.name) == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED

    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", victim.name], check=True, capture_output=True)
    daemon.wait_until(lambda: count("STOPPED", "DESTROYED") >= destroyed0 + 1, 10, "STOPPED/DESTROYED not counted")
    events = daemon.json(f"/api/v1/events?since=0&domain={panic.name}")["events"]
    seq = [(e["event"], e["detail"]) for e in events if e["kind"] == "lifecycle"]
    assert seq[-2:] == [("CRASHED", "PANICKED"), ("STOPPED", "CRASHED")]
    # every event is also one JSON log line
    logged = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    crash_lines = [e for e in logged if e.get("event") == "libvirt_event" and e.get("domain") == panic.name
                   and (e.get("type"), e.get("detail")) == ("STOPPED", "CRASHED")]
    assert len(crash_lines) == 1 and crash_lines[0]["kind"] == "lifecycle" and crash_lines[0]["uuid"]
    assert not [e for e in logged if e.get("event") == "event_subscriber_failed"]


def test_promtool_accepts_a_real_scrape(daemon: VirtwatchProcess, tmp_path: Path) -> None:
    body = daemon.scrape()
    assert "libvirt_domain_block_read_bytes_total" in body
    r = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=body.encode(),
                       capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


NIC_COUNTERS = ("libvirt_domain_interface_receive_bytes_total", "libvirt_domain_interface_transmit_bytes_total",
                "libvirt_domain_interface_receive_packets_total", "libvirt_domain_interface_transmit_drops_total")


def test_restarts_keep_one_series_set_per_nic(daemon: VirtwatchProcess, nics) -> None:
    """Issue 14: three restarts give the guest new taps every time (libvirt never reuses a
    vnetN), yet every scrape shows the same two NIC series, keyed by alias; only
    libvirt_domain_interface_info's target follows the tap."""
    seen: set[str] = set()  # every device label any scrape showed for the guest

    def nic_info() -> dict[str, str]:
        text = daemon.scrape()
        for name in NIC_COUNTERS:
            labels = _series(text, name, nics.name)
            seen.update(lab["device"] for lab in labels)
            assert len(labels) == len({lab["device"] for lab in labels}), labels  # never two per device
        return {lab["device"]: lab["target"] for lab in _series(text, "libvirt_domain_interface_info", nics.name)}

    taps = []
    keys = set(_live_nics(nics.dom))
    assert len(keys) == 2 and "ua-mgmt" in keys, keys  # the other is libvirt's own alias (net0)
    for restart in range(4):
        if restart:
            nics.dom.destroy()
            nics.dom.create()
        live = _live_nics(nics.dom)
        assert set(live) == keys, live
        taps.append(tuple(sorted(live.values())))
        daemon.wait_until(lambda live=live: nic_info() == live, 20, f"NICs {live} not exported")
    assert len(set(taps)) == 4, f"libvirt reused a tap: {taps}"  # so the old key would have churned
    assert seen == keys
    text = daemon.scrape()
    for name in NIC_COUNTERS:
        assert sorted(lab["device"] for lab in _series(text, name, nics.name)) == sorted(keys), name
    mac = {lab["device"]: lab["mac"] for lab in _series(text, "libvirt_domain_interface_info", nics.name)}
    assert all(m.startswith("52:54:00:") for m in mac.values()), mac
    print(f"\ntaps over 3 restarts: {taps}; series keys: {sorted(seen)}")


def test_balloon_period_zero_drops_guest_memory_figures(daemon: VirtwatchProcess, nics) -> None:
    """Issue 14: ``virsh dommemstat --period 0 --live`` stops the guest's balloon reports;
    within 3 periods (2 s each) plus one balloon read (every 4th poll by default,
    stats.group_intervals) and a poll the guest-reported figures are gone and
    libvirt_domain_memory_stats_stale is 1; period 2 again brings them back."""
    period, poll, balloon_read = 2, 1.0, 4.0
    guest_reported = ("libvirt_domain_memory_usable_bytes", "libvirt_domain_memory_available_bytes",
                      "libvirt_domain_memory_unused_bytes", "libvirt_domain_memory_disk_caches_bytes",
                      "libvirt_domain_memory_swap_in_bytes_total", "libvirt_domain_memory_swap_out_bytes_total",
                      "libvirt_domain_memory_major_faults_total", "libvirt_domain_memory_minor_faults_total")

    def state() -> tuple[float | None, float | None]:
        text = daemon.scrape()
        return (sample(text, "libvirt_domain_memory_stats_stale", domain=nics.name),
                sample(text, "libvirt_domain_memory_usable_bytes", domain=nics.name))

    daemon.wait_until(lambda: state()[0] == 0 and (state()[1] or 0) > 0, 60, "balloon figures never current")
    nics.dom.setMemoryStatsPeriod(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    t0 = time.monotonic()
    try:
        daemon.wait_until(lambda: state() == (1, None), 3 * period + balloon_read + 5, "figures not dropped")
        took = time.monotonic() - t0
        text = daemon.scrape()
        for name in guest_reported:
            assert sample(text, name, domain=nics.name) is None, name
        assert sample(text, "libvirt_domain_memory_balloon_current_bytes", domain=nics.name) > 0
        assert sample(text, "libvirt_domain_memory_rss_bytes", domain=nics.name) > 0
        assert sample(text, "libvirt_domain_stats_stale", domain=nics.name) == 0  # the guest itself answers
        j = daemon.json(f"/api/v1/guests/{nics.name}")
        assert j["memory_stats_stale"] is True and j["memory_usable_bytes"] is None
        print(f"\nguest memory figures dropped {took:.1f} s after the balloon period was set to 0")
        assert took <= 3 * period + balloon_read + 2 * poll
    finally:
        nics.dom.setMemoryStatsPeriod(period, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    daemon.wait_until(lambda: state()[0] == 0 and (state()[1] or 0) > 0, 20, "figures not back after period 2")


def test_libvirtd_restart_is_survived(daemon: VirtwatchProcess, busy) -> None:
    before = sample(daemon.scrape(), "libvirt_connection_reconnects_total")
    subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False)
    daemon.wait_until(lambda: sample(daemon.scrape(), "libvirt_up") == 0, 15, "loss of libvirtd not noticed")
    subprocess.run(["bash", str(START_SCRIPT)], check=True, capture_output=True, timeout=120)
    daemon.wait_until(lambda: sample(daemon.scrape(), "libvirt_up") == 1, 60, "did not reconnect")
    text = daemon.scrape()
    assert sample(text, "libvirt_connection_reconnects_total") == before + 1
    for g in busy:  # guests kept running and are known again after the resync
        assert sample(text, "libvirt_domain_state_code", domain=g.name) == 1
