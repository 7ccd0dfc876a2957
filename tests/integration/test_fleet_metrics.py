"""Fleet-facing /metrics on the test driver: host identity, gzip, the series budget, label caps.

Each daemon runs on its own ``test:///…/host.xml`` host (a private copy per connection),
with one guest of 8 vCPUs, a disk whose source path is 300 characters long and a NIC.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import until
from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.metrics.bounds import MAX_LABEL_VALUE_CHARS

LONG_PATH = "/var/lib/libvirt/images/" + "p" * 270 + ".qcow2"
HOST_XML = f"""<node>
  <cpu><mhz>2400</mhz><model>x86_64</model><active>4</active><nodes>1</nodes><sockets>1</sockets>
       <cores>2</cores><threads>2</threads></cpu>
  <memory>8388608</memory>
  <domain type='test'>
    <name>fleet1</name><uuid>6f1c7e2a-4b7d-4c55-9a51-2f0f3b6c1e01</uuid>
    <memory unit='KiB'>1048576</memory><vcpu>8</vcpu><os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'><source file='{LONG_PATH}'/><target dev='vda' bus='virtio'/></disk>
      <interface type='network'><source network='default'/></interface>
    </devices>
  </domain>
</node>
"""


@pytest.fixture
def host_uri(tmp_path: Path) -> str:
    path = tmp_path / "host.xml"
    path.write_text(HOST_XML)
    return f"test://{path}"


async def get(d: Daemon, accept_encoding: str | None) -> tuple[aiohttp.ClientResponse, bytes]:
    """GET /metrics without decompressing; (response, raw body)."""
    host, port = d.listen_address
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding is not None else {}
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as s, \
            s.get(f"http://{host}:{port}/metrics", headers=headers) as r:
        return r, await r.read()


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


@pytest.fixture
async def start(event_impl: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Daemon] = []

    async def make(uri: str, max_series: int = 0) -> Daemon:
        n = len(started)
        settings = load_settings(None, {"libvirt.uri": uri, "http.listen": "127.0.0.1:0", "stats.poll_interval": 0.3,
                                        "log.events": False, "metrics.max_series": max_series,
                                        "daemon.state_dir": str(tmp_path / f"state{n}"),
                                        "daemon.socket": str(tmp_path / f"s{n}.sock")})
        d = Daemon(settings, event_impl)
        started.append(d)
        await d.start()
        await d.connection.ready.wait()
        await until(lambda: d.poller.latest is not None and d.poller.latest.seq >= 2, what="two polls")
        return d

    yield make
    for d in started:
        await d.stop()


async def test_host_identity_gzip_and_capped_labels(start: Callable[..., Any], host_uri: str) -> None:
    d = await start(host_uri)
    conn = libvirt.openReadOnly(host_uri)
    try:
        hostname, version, lib = conn.getHostname(), conn.getVersion(), conn.getLibVersion()
    finally:
        conn.close()

    r, raw = await get(d, "gzip, deflate")
    assert r.status == 200 and r.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in r.headers["Vary"]
    text = gzip.decompress(raw)
    assert len(raw) * 4 < len(text)
    fams = families(text)
    (info,) = fams["libvirt_host_info"].samples
    assert info.labels == {"hostname": hostname, "host_uuid": "", "hypervisor": "TEST",
                           "hypervisor_version": f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
                           "libvirt_version": f"{lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}"}
    (guest,) = fams["libvirt_domain_info"].samples
    assert guest.labels["uuid"] == "6f1c7e2a-4b7d-4c55-9a51-2f0f3b6c1e01"
    # never instance or job: those are the scraper's target labels
    assert not [s for f in fams.values() for s in f.samples if {"instance", "job"} & s.labels.keys()]
    (block,) = fams["libvirt_domain_block_info"].samples
    assert len(block.labels["path"]) == MAX_LABEL_VALUE_CHARS and block.labels["path"].startswith(LONG_PATH[:100])
    # every series but the bounds families is counted, per family and in total
    counted = {name + ("_total" if f.type == "counter" else ""): len(f.samples) for name, f in fams.items()
               if not name.startswith(("virtwatch_exposed_", "virtwatch_series_"))}
    per_family = {s.labels["family"]: s.value for s in fams["virtwatch_exposed_family_series"].samples}
    assert per_family == {name: n for name, n in counted.items() if n}
    assert fams["virtwatch_exposed_series"].samples[0].value == sum(counted.values())

    r, raw = await get(d, None)
    assert r.status == 200 and "Content-Encoding" not in r.headers
    assert families(raw)["libvirt_host_info"].samples[0].labels == info.labels
    r, raw = await get(d, "identity")
    assert "Content-Encoding" not in r.headers and raw.startswith(b"# HELP")


async def test_series_budget_leaves_out_vcpus_first_and_never_state(start: Callable[..., Any], host_uri: str) -> None:
    full = families((await get(await start(host_uri), None))[1])
    total = full["virtwatch_exposed_series"].samples[0].value
    vcpu = len(full["libvirt_domain_vcpu_time_seconds"].samples)
    assert vcpu == 8

    # 4 under the total: leaving out the 8 per-vCPU series fits, with room for a daemon whose
    # own series differ by a few from the first one's
    d = await start(host_uri, max_series=int(total) - 4)
    await get(d, None)  # a scrape's own series (collector success, ...) exist from the first scrape on
    poll = d.poller.latest.seq
    await until(lambda: d.poller.latest.seq >= poll + 2, what="two polls under the budget")
    fams = families((await get(d, None))[1])
    assert "libvirt_domain_vcpu_time_seconds" not in fams
    assert "libvirt_domain_block_read_requests" in fams and "libvirt_domain_info" in fams
    assert fams["virtwatch_series_budget"].samples[0].value == total - 4
    assert fams["virtwatch_series_budget_tiers_dropped"].samples[0].value == 1
    dropped = {s.labels["family"]: s.value for s in fams["virtwatch_series_dropped"].samples}
    assert set(dropped) == {"libvirt_domain_vcpu_time_seconds_total"}
    assert dropped["libvirt_domain_vcpu_time_seconds_total"] >= 8

    tight = await start(host_uri, max_series=10)
    poll = tight.poller.latest.seq
    await until(lambda: tight.poller.latest.seq >= poll + 2, what="two polls under the budget")
    fams = families(gzip.decompress((await get(tight, "gzip"))[1]))
    assert fams["virtwatch_series_budget_tiers_dropped"].samples[0].value == 3
    for gone in ("libvirt_domain_block_info", "libvirt_domain_block_read_bytes", "libvirt_domain_interface_info",
                 "libvirt_domain_interface_receive_packets"):
        assert gone not in fams
    for kept in ("libvirt_domain_info", "libvirt_domain_state_code", "libvirt_host_info", "libvirt_domains",
                 "libvirt_domain_cpu_time_seconds"):
        assert fams[kept].samples, kept
