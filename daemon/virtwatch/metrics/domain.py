"""Mapping libvirt statistics to Prometheus metric families (pure functions).

Input: the typed-parameter dicts of ``getAllDomainStats`` (keys such as
``cpu.time``, ``balloon.usable``, ``block.0.rd.bytes``, ``net.1.tx.pkts``)
plus guest state from events. Output: prometheus-client metric families in
base units — nanoseconds become seconds, KiB become bytes.

A key libvirt did not return produces no sample, never a 0: with NOWAIT a
busy guest omits fields, and a fake 0 would make ``rate()`` spike.

Series keys that survive restarts: disks are labelled ``target`` (``vda``, the
guest-visible name); NICs ``device``, the libvirt alias (``net0``, ``ua-...``) or,
where there is none, the MAC, from the live domain XML the poller attached
(:class:`~virtwatch.virt.devices.DomainDevices`). The tap (``vnet12``, new at
every start) is only a label of ``libvirt_domain_interface_info``. A NIC whose
XML has not been read gives no sample rather than a series under its tap name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..state import GuestView, count_by_state
from ..virt.decode import state_name
from ..virt.stats import HostStats, Snapshot

NS = 1e-9
KIB = 1024

# (stats key, metric suffix, kind, scale, help)
CPU_FIELDS = (
    ("cpu.time", "cpu_time_seconds", "counter", NS, "Guest CPU time (cpu.time)."),
    ("cpu.user", "cpu_user_seconds", "counter", NS, "Guest CPU time in user mode (cpu.user)."),
    ("cpu.system", "cpu_system_seconds", "counter", NS, "Guest CPU time in kernel mode (cpu.system)."),
)
BALLOON_FIELDS = (
    ("balloon.maximum", "memory_maximum_bytes", "gauge", KIB, "Maximum memory the guest may use (balloon.maximum)."),
    ("balloon.current", "memory_balloon_current_bytes", "gauge", KIB,
     "Memory currently assigned by the balloon (balloon.current)."),
    ("balloon.rss", "memory_rss_bytes", "gauge", KIB, "Resident memory of the QEMU process (balloon.rss)."),
    ("balloon.unused", "memory_unused_bytes", "gauge", KIB,
     "Memory the guest leaves unused (balloon.unused, needs a balloon driver)."),
    ("balloon.available", "memory_available_bytes", "gauge", KIB,
     "Memory the guest sees as total (balloon.available, needs a balloon driver)."),
    ("balloon.usable", "memory_usable_bytes", "gauge", KIB,
     "Memory the guest can use without swapping (balloon.usable, needs a balloon driver)."),
    ("balloon.disk_caches", "memory_disk_caches_bytes", "gauge", KIB,
     "Guest page cache that can be reclaimed (balloon.disk_caches)."),
    ("balloon.swap_in", "memory_swap_in_bytes", "counter", KIB, "Memory swapped in by the guest (balloon.swap_in)."),
    ("balloon.swap_out", "memory_swap_out_bytes", "counter", KIB,
     "Memory swapped out by the guest (balloon.swap_out)."),
    ("balloon.major_fault", "memory_major_faults", "counter", 1, "Guest major page faults (balloon.major_fault)."),
    ("balloon.minor_fault", "memory_minor_faults", "counter", 1, "Guest minor page faults (balloon.minor_fault)."),
    ("balloon.last-update", "memory_stats_last_update_timestamp_seconds", "gauge", 1,
     "When the guest last reported balloon statistics (balloon.last-update)."),
    ("vcpu.current", "vcpu_current", "gauge", 1, "Virtual CPUs online (vcpu.current)."),
    ("vcpu.maximum", "vcpu_maximum", "gauge", 1, "Maximum virtual CPUs (vcpu.maximum)."),
)
VCPU_FIELDS = (
    ("time", "vcpu_time_seconds", "counter", NS, "Time the vCPU ran (vcpu.N.time)."),
    ("wait", "vcpu_wait_seconds", "counter", NS, "Time the vCPU waited for I/O (vcpu.N.wait)."),
    ("delay", "vcpu_delay_seconds", "counter", NS,
     "Time the vCPU was runnable but waited for a host CPU (vcpu.N.delay)."),
)
BLOCK_FIELDS = (
    ("rd.bytes", "block_read_bytes", "counter", 1, "Bytes read from the disk (block.N.rd.bytes)."),
    ("wr.bytes", "block_write_bytes", "counter", 1, "Bytes written to the disk (block.N.wr.bytes)."),
    ("rd.reqs", "block_read_requests", "counter", 1, "Read requests (block.N.rd.reqs)."),
    ("wr.reqs", "block_write_requests", "counter", 1, "Write requests (block.N.wr.reqs)."),
    ("fl.reqs", "block_flush_requests", "counter", 1, "Flush requests (block.N.fl.reqs)."),
    ("rd.times", "block_read_time_seconds", "counter", NS, "Time spent reading (block.N.rd.times)."),
    ("wr.times", "block_write_time_seconds", "counter", NS, "Time spent writing (block.N.wr.times)."),
    ("fl.times", "block_flush_time_seconds", "counter", NS, "Time spent flushing (block.N.fl.times)."),
    ("allocation", "block_allocation_bytes", "gauge", 1,
     "Highest written offset / allocated bytes of the image (block.N.allocation)."),
    ("capacity", "block_capacity_bytes", "gauge", 1, "Virtual size of the disk (block.N.capacity)."),
    ("physical", "block_physical_bytes", "gauge", 1, "Size of the image on the host (block.N.physical)."),
)
NET_FIELDS = (
    ("rx.bytes", "interface_receive_bytes", "Bytes received by the guest (net.N.rx.bytes)."),
    ("rx.pkts", "interface_receive_packets", "Packets received (net.N.rx.pkts)."),
    ("rx.errs", "interface_receive_errors", "Receive errors (net.N.rx.errs)."),
    ("rx.drop", "interface_receive_drops", "Received packets dropped (net.N.rx.drop)."),
    ("tx.bytes", "interface_transmit_bytes", "Bytes sent by the guest (net.N.tx.bytes)."),
    ("tx.pkts", "interface_transmit_packets", "Packets sent (net.N.tx.pkts)."),
    ("tx.errs", "interface_transmit_errors", "Transmit errors (net.N.tx.errs)."),
    ("tx.drop", "interface_transmit_drops", "Sent packets dropped (net.N.tx.drop)."),
)


def _family(name: str, kind: str, doc: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _count(stats: Mapping[str, Any], prefix: str) -> int:
    n = stats.get(f"{prefix}.count")
    return int(n) if isinstance(n, int) else 0


def domain_families(guests: Iterable[GuestView], snapshot: Snapshot | None,
                    migrating: Mapping[str, str] | None = None) -> list[Metric]:
    """Every per-guest family.

    Args:
        guests: state from events/resync (identity, state, agent).
        snapshot: latest poll; guests it lacks get state metrics only.
        migrating: UUID → ``in``/``out`` of the guests migrating (the ``migrating`` label of
            ``libvirt_domain_info``, ``""`` for the others: fleet sums leave the incoming copy out).

    Returns families named ``libvirt_domain_*``; a guest that vanished from
    ``guests`` produces nothing, even if the snapshot still has it.
    """
    p = "libvirt_domain_"
    info = GaugeMetricFamily(p + "info", "Guest identity and attributes (value 1).",
                             labels=["domain", "uuid", "persistent", "autostart", "migrating"])
    state = GaugeMetricFamily(p + "state_code", "virDomainState: 0 nostate, 1 running, 2 blocked, 3 paused, "
                              "4 shutdown, 5 shutoff, 6 crashed, 7 pmsuspended.", labels=["domain"])
    reason = GaugeMetricFamily(p + "state_reason_code", "Reason code of the current state (virDomainGetState).",
                               labels=["domain"])
    stale = GaugeMetricFamily(p + "stats_stale", "1 if the guest did not answer the last statistics poll in time.",
                              labels=["domain"])
    age = GaugeMetricFamily(p + "stats_age_seconds",
                            "Seconds between the latest poll and when this guest's statistics were read "
                            "(grows while the guest is stale).", labels=["domain"])
    agent = GaugeMetricFamily(p + "guest_agent_connected",
                              "1 if the QEMU guest agent channel is connected (AGENT_LIFECYCLE events).",
                              labels=["domain"])
    scalar = {key: _family(p + suffix, kind, doc, ["domain"])
              for key, suffix, kind, _s, doc in CPU_FIELDS + BALLOON_FIELDS}
    scale = {key: s for key, _x, _k, s, _d in CPU_FIELDS + BALLOON_FIELDS}
    vcpu = {key: _family(p + suffix, kind, doc, ["domain", "vcpu"]) for key, suffix, kind, _s, doc in VCPU_FIELDS}
    vcpu_scale = {key: s for key, _x, _k, s, _d in VCPU_FIELDS}
    block = {key: _family(p + suffix, kind, doc, ["domain", "target"]) for key, suffix, kind, _s, doc in BLOCK_FIELDS}
    block_scale = {key: s for key, _x, _k, s, _d in BLOCK_FIELDS}
    block_info = GaugeMetricFamily(p + "block_info", "Disk source path per target (value 1).",
                                   labels=["domain", "target", "path"])
    net = {key: CounterMetricFamily(p + suffix, doc, labels=["domain", "device"]) for key, suffix, doc in NET_FIELDS}
    net_info = GaugeMetricFamily(p + "interface_info",
                                 "Guest NIC (value 1): device = libvirt alias, else MAC; target = host-side device "
                                 "(tap, new at every start); source = network, bridge or host device; from the live "
                                 "domain XML.", labels=["domain", "device", "target", "mac", "type", "source",
                                                        "bridge", "model"])
    memory_stale = GaugeMetricFamily(p + "memory_stats_stale",
                                     "1 if the guest's last balloon report (balloon.last-update) is older than 3 "
                                     "balloon periods (3 poll intervals without a period): its guest-reported memory "
                                     "figures are left out; 0 when current.", labels=["domain"])

    domains = snapshot.domains if snapshot is not None else {}
    for g in guests:
        name = g.name
        info.add_metric([name, g.uuid, _tri(g.persistent), _tri(g.autostart), (migrating or {}).get(g.uuid, "")], 1)
        state.add_metric([name], g.state)
        reason.add_metric([name], g.reason)
        if g.agent_connected is not None:
            agent.add_metric([name], 1 if g.agent_connected else 0)
        ds = domains.get(g.uuid)
        if ds is None:
            continue
        stale.add_metric([name], 1 if ds.stale else 0)
        if ds.memory_stale is not None:
            memory_stale.add_metric([name], 1 if ds.memory_stale else 0)
        age.add_metric([name], max(0.0, snapshot.time - ds.collected_at) if snapshot is not None else 0.0)
        st = ds.stats
        for key, fam in scalar.items():
            v = st.get(key)
            if isinstance(v, (int, float)):
                fam.add_metric([name], v * scale[key])
        for i in range(int(st.get("vcpu.maximum") or st.get("vcpu.current") or 0)):
            for key, fam in vcpu.items():
                v = st.get(f"vcpu.{i}.{key}")
                if isinstance(v, (int, float)):
                    fam.add_metric([name, str(i)], v * vcpu_scale[key])
        for i in range(_count(st, "block")):
            target = st.get(f"block.{i}.name")
            if not isinstance(target, str):
                continue
            path = st.get(f"block.{i}.path")
            block_info.add_metric([name, target, path if isinstance(path, str) else ""], 1)
            for key, fam in block.items():
                v = st.get(f"block.{i}.{key}")
                if isinstance(v, (int, float)):
                    fam.add_metric([name, target], v * block_scale[key])
        keys: set[str] = set()
        for i in range(_count(st, "net")):
            target = st.get(f"net.{i}.name")
            nic = ds.devices.interface(target) if isinstance(target, str) and ds.devices is not None else None
            if nic is None or nic.key in keys:  # unknown to the XML read, or a duplicate: no churning series
                continue
            keys.add(nic.key)
            net_info.add_metric([name, nic.key, nic.target or str(target), nic.mac, nic.type, nic.source, nic.bridge,
                                 nic.model], 1)
            for key, fam in net.items():
                v = st.get(f"net.{i}.{key}")
                if isinstance(v, (int, float)):
                    fam.add_metric([name, nic.key], v)
    return [info, state, reason, stale, age, memory_stale, agent, *scalar.values(), *vcpu.values(), block_info,
            *block.values(), net_info, *net.values()]


def _tri(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


def host_families(guests: list[GuestView], host: HostStats | None, info: Mapping[str, Any]) -> list[Metric]:
    """Host-level families: versions, guests per state, node, pools, networks.

    ``info`` is the connection's identity dict (libvirt_version,
    hypervisor_version, driver, hostname, host_uuid); empty while never connected.

    ``libvirt_host_info`` is the host's identity for a fleet: ``hostname``
    (``virConnectGetHostname``), ``host_uuid`` (libvirt's host UUID, "" if it has
    none: :func:`~virtwatch.virt.host.host_uuid`), ``hypervisor`` (the driver,
    ``virConnectGetType``: ``QEMU``). No family carries ``instance`` or ``job``:
    those are target labels that service discovery and the scrape config give.
    ``libvirt_version_info`` (same versions, older label names) stays for existing
    dashboards and queries.
    """
    out: list[Metric] = []
    if info:
        h = GaugeMetricFamily("libvirt_host_info",
                              "Host identity (value 1): hostname, libvirt's host UUID, versions and hypervisor "
                              "driver; join on the target labels (instance) to name a series' host.",
                              labels=["hostname", "host_uuid", "libvirt_version", "hypervisor", "hypervisor_version"])
        h.add_metric([str(info.get("hostname", "")), str(info.get("host_uuid", "")),
                      str(info.get("libvirt_version", "")), str(info.get("driver", "")),
                      str(info.get("hypervisor_version", ""))], 1)
        out.append(h)
        v = GaugeMetricFamily("libvirt_version_info", "Versions of libvirt and the hypervisor (value 1).",
                              labels=["libvirt", "hypervisor", "driver"])
        v.add_metric([str(info.get("libvirt_version", "")), str(info.get("hypervisor_version", "")),
                      str(info.get("driver", ""))], 1)
        out.append(v)
    by_state = GaugeMetricFamily("libvirt_domains", "Guests by state.", labels=["state"])
    counts = count_by_state(guests)
    for code in range(0, 8):
        by_state.add_metric([state_name(code)], counts.get(code, 0))
    out.append(by_state)
    if host is None:
        return out
    out.append(GaugeMetricFamily("libvirt_host_stats_timestamp_seconds",
                                 "Unix time the host figures below were read (they are kept when a poll "
                                 "cannot read them).", value=host.collected_at))
    if host.node_info:
        _model, mem_mib, cpus, mhz = host.node_info[:4]
        g = GaugeMetricFamily("libvirt_node_cpus", "Active host CPUs (virNodeGetInfo).", value=cpus)
        out.append(g)
        out.append(GaugeMetricFamily("libvirt_node_cpu_frequency_hertz", "Expected CPU frequency (virNodeGetInfo).",
                                     value=mhz * 1e6))
        out.append(GaugeMetricFamily("libvirt_node_memory_bytes", "Host memory (virNodeGetInfo).",
                                     value=mem_mib * 1024 * 1024))
    if host.memory:
        for key in ("total", "free", "buffers", "cached"):
            if key in host.memory:
                out.append(GaugeMetricFamily(f"libvirt_node_memory_{key}_bytes",
                                             f"Host memory {key} (virNodeGetMemoryStats).",
                                             value=host.memory[key] * KIB))
    if host.cpu:
        for key in ("kernel", "user", "idle", "iowait"):
            if key in host.cpu:
                out.append(CounterMetricFamily(f"libvirt_node_cpu_{key}_seconds",
                                               f"Host CPU time in {key} mode, all CPUs (virNodeGetCPUStats).",
                                               value=host.cpu[key] * NS))
    pool_fams = {
        "capacity": GaugeMetricFamily("libvirt_storage_pool_capacity_bytes", "Storage pool capacity.",
                                      labels=["pool"]),
        "allocation": GaugeMetricFamily("libvirt_storage_pool_allocation_bytes", "Storage pool allocation.",
                                        labels=["pool"]),
        "available": GaugeMetricFamily("libvirt_storage_pool_available_bytes", "Storage pool free space.",
                                       labels=["pool"]),
    }
    pool_state = GaugeMetricFamily("libvirt_storage_pool_state",
                                   "virStoragePoolState: 0 inactive, 1 building, 2 running, 3 degraded, "
                                   "4 inaccessible.", labels=["pool"])
    for pool in host.pools:
        pool_state.add_metric([pool.name], pool.state)
        if pool.active:
            pool_fams["capacity"].add_metric([pool.name], pool.capacity)
            pool_fams["allocation"].add_metric([pool.name], pool.allocation)
            pool_fams["available"].add_metric([pool.name], pool.available)
    out.extend([pool_state, *pool_fams.values()])
    net = GaugeMetricFamily("libvirt_network_active", "1 if the virtual network is active.", labels=["network"])
    for n in host.networks:
        net.add_metric([n.name], 1 if n.active else 0)
    out.append(net)
    return out


STATS_SOURCES = ("bulk", "per_domain")


def stats_source_family(sources: Mapping[str, str]) -> GaugeMetricFamily:
    """``virtwatch_stats_source{group,source}``: for each requested statistics group,
    1 on the path it takes in the latest poll and 0 on the other (a group neither
    path gives, such as ``perf`` on a driver without it, is 0 on both)."""
    fam = GaugeMetricFamily("virtwatch_stats_source",
                            "Path each requested statistics group takes in the latest poll (1) and not (0): "
                            "bulk (getAllDomainStats) or per_domain (classic per-guest calls, for groups the "
                            "bulk call does not return on this connection).", labels=["group", "source"])
    for group, path in sources.items():
        for source in STATS_SOURCES:
            fam.add_metric([group, source], 1 if path == source else 0)
    return fam
