"""Host figures: node info, memory and CPU, storage pools and networks; the host's identity.

Read on the poller's ``host`` lane (:mod:`~virtwatch.virt.stats`): they never touch
a guest, but a storage pool on dead NFS storage can hang them, and guest statistics
must not wait for that (nor host figures for a hung guest).
"""

from __future__ import annotations

import dataclasses
import functools
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import Any

import libvirt

from .calls import attempt as refusable

#: libvirt's own answer when it has no host UUID of its own (an all-zero SMBIOS UUID).
_NO_UUID = "00000000-0000-0000-0000-000000000000"


@dataclasses.dataclass(frozen=True, slots=True)
class PoolInfo:
    """A storage pool from ``virStoragePoolGetInfo`` (never refreshed by us).

    ``state`` is virStoragePoolState (2 running); sizes are bytes.
    """

    name: str
    uuid: str
    state: int
    capacity: int
    allocation: int
    available: int
    active: bool


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A virtual network: ``listAllNetworks`` with the ACTIVE/INACTIVE filter."""

    name: str
    uuid: str
    active: bool


@dataclasses.dataclass(frozen=True, slots=True)
class HostStats:
    """Host figures from one poll; a field libvirt refused is None.

    Attributes:
        node_info: ``virNodeGetInfo`` list [model, memory MiB, cpus, MHz,
            nodes, sockets, cores, threads].
        memory: ``virNodeGetMemoryStats(ALL_CELLS)`` in KiB (total, free, buffers, cached).
        cpu: ``virNodeGetCPUStats(ALL_CPUS)`` in ns (kernel, user, idle, iowait).
        pools, networks: inventory.
        collected_at: wall time (s) the figures were read.
    """

    node_info: tuple[Any, ...] | None
    memory: Mapping[str, int] | None
    cpu: Mapping[str, int] | None
    pools: tuple[PoolInfo, ...]
    networks: tuple[NetworkInfo, ...]
    collected_at: float = 0.0


def read_host(conn: libvirt.virConnect, on_error: Callable[[str, libvirt.libvirtError], None]) -> HostStats:
    """Node info, memory and CPU stats, pools and networks (never refreshes a pool);
    each refused call goes to ``on_error`` and leaves its figure None/empty. Blocking."""


    def attempt(call: str, fn: Callable[[], Any]) -> Any:
        return refusable(call, fn, on_error)

    node_info = attempt("getInfo", conn.getInfo)
    memory = attempt("getMemoryStats", lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS))
    cpu = attempt("getCPUStats", lambda: conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS))
    pools = []
    for pool in attempt("listAllStoragePools", conn.listAllStoragePools) or []:
        info = attempt("storagePoolGetInfo", pool.info)
        if info is None:
            continue
        state, capacity, allocation, available = info
        pools.append(PoolInfo(name=pool.name(), uuid=pool.UUIDString(), state=state, capacity=capacity,
                              allocation=allocation, available=available,
                              active=state == libvirt.VIR_STORAGE_POOL_RUNNING))
    networks = []
    for flag, active in ((libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE, True),
                         (libvirt.VIR_CONNECT_LIST_NETWORKS_INACTIVE, False)):
        for net in attempt("listAllNetworks", functools.partial(conn.listAllNetworks, flag)) or []:
            networks.append(NetworkInfo(name=net.name(), uuid=net.UUIDString(), active=active))
    return HostStats(node_info=tuple(node_info) if node_info else None, memory=memory, cpu=cpu,
                     pools=tuple(sorted(pools, key=lambda p: p.name)),
                     networks=tuple(sorted(networks, key=lambda n: n.name)))


def host_uuid(capabilities: str | None, sysinfo: str | None) -> str:
    """The host's UUID as libvirt reports it, lower case; "" when it reports none.

    First ``<host><uuid>`` of ``virConnectGetCapabilities`` (what libvirtd uses itself:
    ``host_uuid`` of libvirtd.conf, else SMBIOS or /etc/machine-id per ``host_uuid_source``),
    then ``<system><entry name='uuid'>`` of ``virConnectGetSysinfo`` (SMBIOS). Never made
    up: the test driver reports neither, so its hosts have "". Malformed XML or a value
    that is not a UUID counts as none.
    """
    for text, path in ((capabilities, "./host/uuid"), (sysinfo, "./system/entry[@name='uuid']")):
        if not text:
            continue
        try:
            node = ET.fromstring(text).find(path)
        except ET.ParseError:
            continue
        if node is None or not node.text:
            continue
        try:
            value = str(uuidlib.UUID(node.text.strip()))
        except ValueError:
            continue
        if value != _NO_UUID:
            return value
    return ""


def read_host_uuid(conn: libvirt.virConnect) -> str:
    """:func:`host_uuid` of this connection (``getCapabilities``, then ``getSysinfo`` only
    when the capabilities have none); a refused call counts as no answer. Blocking."""

    def ignore(_call: str, _err: libvirt.libvirtError) -> None:
        """An unsupported call (no SMBIOS, the test driver) only means no UUID from it."""

    caps = refusable("getCapabilities", conn.getCapabilities, ignore)
    found = host_uuid(caps, None)
    if found:
        return found
    return host_uuid(None, refusable("getSysinfo", lambda: conn.getSysinfo(0), ignore))
