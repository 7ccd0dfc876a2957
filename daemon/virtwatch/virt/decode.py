"""Decoding libvirt's event callback arguments into :class:`Event` fields.

Each libvirt event ID has its own callback signature. :data:`DOMAIN_EVENTS`
lists, for every domain event ID virtwatch subscribes to, the constant name
of the ID (looked up with ``getattr`` so a libvirt-python built against an
older libvirt simply lacks it), our ``kind`` name and a decoder turning the
callback's positional arguments (without conn, object and opaque) into
``(event, detail, payload)``.

Constant names are read from the ``libvirt`` module by prefix, so the names
are exactly libvirt's (``VIR_DOMAIN_EVENT_STOPPED_CRASHED`` → ``CRASHED``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import libvirt

Decoded = tuple[str, str, dict[str, Any]]

LIFECYCLE_EVENTS = (
    "DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED",
    "STOPPED", "SHUTDOWN", "PMSUSPENDED", "CRASHED",
)


#: Prefixes whose constants share the namespace with unrelated enums: for
#: these only the listed suffixes are members of the enum we decode.
_ENUM_MEMBERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "VIR_DOMAIN_": ("NOSTATE", "RUNNING", "BLOCKED", "PAUSED", "SHUTDOWN", "SHUTOFF", "CRASHED", "PMSUSPENDED"),
    "VIR_DOMAIN_EVENT_GRAPHICS_": ("CONNECT", "INITIALIZE", "DISCONNECT"),
    "VIR_DOMAIN_BLOCK_JOB_": ("COMPLETED", "FAILED", "CANCELED", "READY"),
    "VIR_DOMAIN_EVENT_DISK_": ("CHANGE_MISSING_ON_START", "DROP_MISSING_ON_START"),
    "VIR_DOMAIN_EVENT_TRAY_CHANGE_": ("OPEN", "CLOSE"),
    "VIR_DOMAIN_METADATA_": ("DESCRIPTION", "TITLE", "ELEMENT"),
    "VIR_DOMAIN_EVENT_WATCHDOG_": ("NONE", "PAUSE", "RESET", "POWEROFF", "SHUTDOWN", "DEBUG", "INJECTNMI"),
    "VIR_DOMAIN_EVENT_IO_ERROR_": ("NONE", "PAUSE", "REPORT"),
    "VIR_DOMAIN_SHUTDOWN_": ("UNKNOWN", "USER"),
})


@functools.cache
def constant_names(prefix: str) -> Mapping[int, str]:
    """``{value: NAME}`` of the ``libvirt`` integer constants of one enum.

    ``NAME`` is the constant name without ``prefix``. Where ``prefix`` is
    shared with other enums only the members listed in ``_ENUM_MEMBERS`` count;
    otherwise every constant starting with ``prefix`` does, except ``*_LAST``
    sentinels and event-ID constants (``*_ID_*``). The first name in sorted
    order wins when two share a value. Empty when libvirt has no such enum.
    """
    members = _ENUM_MEMBERS.get(prefix)
    attrs = [prefix + m for m in members] if members else sorted(dir(libvirt))
    out: dict[int, str] = {}
    for attr in attrs:
        suffix = attr[len(prefix):]
        if not attr.startswith(prefix) or suffix.endswith("LAST") or suffix.startswith("ID_"):
            continue
        value = getattr(libvirt, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out.setdefault(value, suffix)
    return MappingProxyType(out)


def name_of(prefix: str, value: int) -> str:
    """Name of ``value`` in the enum ``prefix``.

    ``"UNKNOWN_<n>"`` for a value the enum lacks; ``""`` when libvirt has no
    such enum at all (e.g. network lifecycle events carry no detail codes).
    """
    names = constant_names(prefix)
    if not names:
        return ""
    return names.get(value, f"UNKNOWN_{value}")


@functools.cache
def _lifecycle_event_names() -> Mapping[int, str]:
    out = {}
    for name in LIFECYCLE_EVENTS:
        value = getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}", None)
        if value is not None:
            out[value] = name
    return MappingProxyType(out)


def lifecycle_names(event: int, detail: int) -> tuple[str, str]:
    """Decode a lifecycle (event, detail) pair, e.g. ``(5, 2)`` → ``("STOPPED", "CRASHED")``.

    Unknown codes decode as ``UNKNOWN_<n>`` rather than raising.
    """
    ev = _lifecycle_event_names().get(event, f"UNKNOWN_{event}")
    return ev, name_of(f"VIR_DOMAIN_EVENT_{ev}_", detail)


def state_name(state: int) -> str:
    """virDomainState code → lower-case name (``1`` → ``running``)."""
    return name_of("VIR_DOMAIN_", state).lower()

_STATE_REASON_PREFIX = {
    libvirt.VIR_DOMAIN_NOSTATE: "VIR_DOMAIN_NOSTATE_",
    libvirt.VIR_DOMAIN_RUNNING: "VIR_DOMAIN_RUNNING_",
    libvirt.VIR_DOMAIN_BLOCKED: "VIR_DOMAIN_BLOCKED_",
    libvirt.VIR_DOMAIN_PAUSED: "VIR_DOMAIN_PAUSED_",
    libvirt.VIR_DOMAIN_SHUTDOWN: "VIR_DOMAIN_SHUTDOWN_",
    libvirt.VIR_DOMAIN_SHUTOFF: "VIR_DOMAIN_SHUTOFF_",
    libvirt.VIR_DOMAIN_CRASHED: "VIR_DOMAIN_CRASHED_",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "VIR_DOMAIN_PMSUSPENDED_",
}


def state_reason_name(state: int, reason: int) -> str:
    """Reason code for ``state`` → lower-case name (paused, 2 → ``ioerror``)."""
    prefix = _STATE_REASON_PREFIX.get(state)
    if prefix is None:
        return f"unknown_{reason}"
    return name_of(prefix, reason).lower()


# -- per-ID decoders (args exclude conn, object and opaque) -------------------

def _lifecycle(event: int, detail: int) -> Decoded:
    ev, det = lifecycle_names(event, detail)
    return ev, det, {}


def _plain(event: str) -> Callable[..., Decoded]:
    def decode(*_args: Any) -> Decoded:
        return event, "", {}
    return decode


def _rtc(offset: int) -> Decoded:
    return "RTC_CHANGE", "", {"offset_seconds": offset}


def _watchdog(action: int) -> Decoded:
    return "WATCHDOG", name_of("VIR_DOMAIN_EVENT_WATCHDOG_", action), {}


def _io_error_reason(src: str, dev: str, action: int, reason: str) -> Decoded:
    return "IO_ERROR", reason or "unknown", {
        "src": src, "dev": dev, "action": name_of("VIR_DOMAIN_EVENT_IO_ERROR_", action)}


def _addr(a: Any) -> Any:
    return dict(a) if isinstance(a, dict) else a


def _graphics(phase: int, local: Any, remote: Any, scheme: str, subject: Any) -> Decoded:
    return "GRAPHICS", name_of("VIR_DOMAIN_EVENT_GRAPHICS_", phase), {
        "local": _addr(local), "remote": _addr(remote), "auth_scheme": scheme,
        "subject": [list(s) for s in subject] if subject else []}


def _block_job(disk: str, job_type: int, status: int) -> Decoded:
    return ("BLOCK_JOB", name_of("VIR_DOMAIN_BLOCK_JOB_", status),
            {"disk": disk, "type": name_of("VIR_DOMAIN_BLOCK_JOB_TYPE_", job_type)})


def _disk_change(old: str, new: str, dev: str, reason: int) -> Decoded:
    return "DISK_CHANGE", name_of("VIR_DOMAIN_EVENT_DISK_", reason), {"old_src": old, "new_src": new, "dev": dev}


def _tray(dev: str, reason: int) -> Decoded:
    return "TRAY_CHANGE", name_of("VIR_DOMAIN_EVENT_TRAY_CHANGE_", reason), {"dev": dev}


def _balloon(actual_kib: int) -> Decoded:
    return "BALLOON_CHANGE", "", {"actual_bytes": actual_kib * 1024}


def _device(event: str) -> Callable[[str], Decoded]:
    def decode(alias: str) -> Decoded:
        return event, "", {"dev": alias}
    return decode


def _params(event: str) -> Callable[[Any], Decoded]:
    def decode(params: Any) -> Decoded:
        return event, "", {"params": dict(params or {})}
    return decode


def _agent(state: int, reason: int) -> Decoded:
    return (name_of("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_", state),
            name_of("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_", reason), {})


def _migration_iteration(iteration: int) -> Decoded:
    return "MIGRATION_ITERATION", "", {"iteration": iteration}


def _metadata(mtype: int, nsuri: str | None) -> Decoded:
    return "METADATA_CHANGE", name_of("VIR_DOMAIN_METADATA_", mtype), {"nsuri": nsuri or ""}


def _block_threshold(dev: str, path: str, threshold: int, excess: int) -> Decoded:
    return "BLOCK_THRESHOLD", "", {"dev": dev, "path": path, "threshold_bytes": threshold, "excess_bytes": excess}


def _memory_failure(recipient: int, action: int, flags: int) -> Decoded:
    return ("MEMORY_FAILURE", name_of("VIR_DOMAIN_EVENT_MEMORY_FAILURE_ACTION_", action),
            {"recipient": name_of("VIR_DOMAIN_EVENT_MEMORY_FAILURE_RECIPIENT_", recipient), "flags": flags})


def _memory_device_size(alias: str, size_kib: int) -> Decoded:
    return "MEMORY_DEVICE_SIZE_CHANGE", "", {"dev": alias, "size_bytes": size_kib * 1024}


def _nic_mac(alias: str, old: str, new: str) -> Decoded:
    return "NIC_MAC_CHANGE", "", {"dev": alias, "old_mac": old, "new_mac": new}


def _vcpu_removed(vcpu: int) -> Decoded:
    return "VCPU_REMOVED", "", {"vcpu": vcpu}


def _pm(event: str) -> Callable[[int], Decoded]:
    def decode(reason: int) -> Decoded:
        return event, "", {}
    return decode


class EventSpec(NamedTuple):
    """One subscribable event ID: libvirt constant name, our kind, decoder."""

    id_name: str
    kind: str
    decode: Callable[..., Decoded]


#: Domain event IDs. ``IO_ERROR`` and ``BLOCK_JOB`` are deliberately absent:
#: libvirt emits the same occurrence again as ``IO_ERROR_REASON`` (which adds
#: the reason) and ``BLOCK_JOB_2`` (which names the disk by target), and
#: subscribing to both would count every I/O error and block job twice.
DOMAIN_EVENTS: tuple[EventSpec, ...] = (
    EventSpec("VIR_DOMAIN_EVENT_ID_LIFECYCLE", "lifecycle", _lifecycle),
    EventSpec("VIR_DOMAIN_EVENT_ID_REBOOT", "reboot", _plain("REBOOT")),
    EventSpec("VIR_DOMAIN_EVENT_ID_RTC_CHANGE", "rtc_change", _rtc),
    EventSpec("VIR_DOMAIN_EVENT_ID_WATCHDOG", "watchdog", _watchdog),
    EventSpec("VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON", "io_error", _io_error_reason),
    EventSpec("VIR_DOMAIN_EVENT_ID_GRAPHICS", "graphics", _graphics),
    EventSpec("VIR_DOMAIN_EVENT_ID_CONTROL_ERROR", "control_error", _plain("CONTROL_ERROR")),
    EventSpec("VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2", "block_job", _block_job),
    EventSpec("VIR_DOMAIN_EVENT_ID_DISK_CHANGE", "disk_change", _disk_change),
    EventSpec("VIR_DOMAIN_EVENT_ID_TRAY_CHANGE", "tray_change", _tray),
    EventSpec("VIR_DOMAIN_EVENT_ID_PMWAKEUP", "pm_wakeup", _pm("PMWAKEUP")),
    EventSpec("VIR_DOMAIN_EVENT_ID_PMSUSPEND", "pm_suspend", _pm("PMSUSPEND")),
    EventSpec("VIR_DOMAIN_EVENT_ID_PMSUSPEND_DISK", "pm_suspend_disk", _pm("PMSUSPEND_DISK")),
    EventSpec("VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE", "balloon_change", _balloon),
    EventSpec("VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED", "device_removed", _device("DEVICE_REMOVED")),
    EventSpec("VIR_DOMAIN_EVENT_ID_DEVICE_ADDED", "device_added", _device("DEVICE_ADDED")),
    EventSpec("VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED", "device_removal_failed", _device("DEVICE_REMOVAL_FAILED")),
    EventSpec("VIR_DOMAIN_EVENT_ID_TUNABLE", "tunable", _params("TUNABLE")),
    EventSpec("VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE", "agent_lifecycle", _agent),
    EventSpec("VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION", "migration_iteration", _migration_iteration),
    EventSpec("VIR_DOMAIN_EVENT_ID_JOB_COMPLETED", "job_completed", _params("JOB_COMPLETED")),
    EventSpec("VIR_DOMAIN_EVENT_ID_METADATA_CHANGE", "metadata_change", _metadata),
    EventSpec("VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD", "block_threshold", _block_threshold),
    EventSpec("VIR_DOMAIN_EVENT_ID_MEMORY_FAILURE", "memory_failure", _memory_failure),
    EventSpec("VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE", "memory_device_size_change", _memory_device_size),
    EventSpec("VIR_DOMAIN_EVENT_ID_NIC_MAC_CHANGE", "nic_mac_change", _nic_mac),
    EventSpec("VIR_DOMAIN_EVENT_ID_VCPU_REMOVED", "vcpu_removed", _vcpu_removed),
)


def _object_lifecycle(prefix: str) -> Callable[[int, int], Decoded]:
    def decode(event: int, detail: int) -> Decoded:
        ev = name_of(prefix, event)
        return ev, name_of(f"{prefix}{ev}_", detail), {}
    return decode


class HostEventSpec(NamedTuple):
    """A non-domain event: which register method, object source, constant, kind."""

    register: str
    deregister: str
    source: str
    id_name: str
    kind: str
    decode: Callable[..., Decoded]


HOST_EVENTS: tuple[HostEventSpec, ...] = (
    HostEventSpec("networkEventRegisterAny", "networkEventDeregisterAny", "network",
                  "VIR_NETWORK_EVENT_ID_LIFECYCLE", "network_lifecycle", _object_lifecycle("VIR_NETWORK_EVENT_")),
    HostEventSpec("storagePoolEventRegisterAny", "storagePoolEventDeregisterAny", "storage_pool",
                  "VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE", "storage_pool_lifecycle",
                  _object_lifecycle("VIR_STORAGE_POOL_EVENT_")),
    HostEventSpec("nodeDeviceEventRegisterAny", "nodeDeviceEventDeregisterAny", "node_device",
                  "VIR_NODE_DEVICE_EVENT_ID_LIFECYCLE", "node_device_lifecycle",
                  _object_lifecycle("VIR_NODE_DEVICE_EVENT_")),
    HostEventSpec("secretEventRegisterAny", "secretEventDeregisterAny", "secret",
                  "VIR_SECRET_EVENT_ID_LIFECYCLE", "secret_lifecycle", _object_lifecycle("VIR_SECRET_EVENT_")),
)


def available_domain_events() -> list[tuple[int, EventSpec]]:
    """``(event_id, spec)`` for each domain event this libvirt-python offers."""
    out = []
    for spec in DOMAIN_EVENTS:
        eid = getattr(libvirt, spec.id_name, None)
        if eid is not None:
            out.append((eid, spec))
    return out
