"""Stats groups: their ``VIR_DOMAIN_STATS_*`` flags and field prefixes, and which of
them a poll reads (``stats.group_intervals``). Pure functions, no libvirt calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import libvirt

GROUP_FLAGS: Mapping[str, str] = {
    "state": "VIR_DOMAIN_STATS_STATE",
    "cpu": "VIR_DOMAIN_STATS_CPU_TOTAL",
    "balloon": "VIR_DOMAIN_STATS_BALLOON",
    "vcpu": "VIR_DOMAIN_STATS_VCPU",
    "interface": "VIR_DOMAIN_STATS_INTERFACE",
    "block": "VIR_DOMAIN_STATS_BLOCK",
    "perf": "VIR_DOMAIN_STATS_PERF",
    "iothread": "VIR_DOMAIN_STATS_IOTHREAD",
    "memory": "VIR_DOMAIN_STATS_MEMORY",
    "dirtyrate": "VIR_DOMAIN_STATS_DIRTYRATE",
    "vm": "VIR_DOMAIN_STATS_VM",
}


def stats_flags(groups: tuple[str, ...]) -> int:
    """OR of the ``VIR_DOMAIN_STATS_*`` flags for ``groups`` this libvirt knows."""
    flags = 0
    for g in groups:
        flags |= getattr(libvirt, GROUP_FLAGS[g], 0)
    return flags


#: the key prefix of each group's fields in a ``getAllDomainStats`` answer
GROUP_PREFIXES: Mapping[str, str] = {
    "state": "state.", "cpu": "cpu.", "balloon": "balloon.", "vcpu": "vcpu.", "interface": "net.",
    "block": "block.", "perf": "perf.", "iothread": "iothread.", "memory": "memory.", "dirtyrate": "dirtyrate.",
    "vm": "vm.",
}


_GROUP_BY_PREFIX = {prefix: group for group, prefix in GROUP_PREFIXES.items()}


def polls_per_read(intervals: Mapping[str, float], poll_interval: float) -> dict[str, int]:
    """Every how many polls each group of ``intervals`` (seconds) is read: the interval
    rounded to whole polls, at least 1."""
    return {g: max(1, round(seconds / poll_interval)) for g, seconds in intervals.items()}


def due_groups(groups: Iterable[str], every: Mapping[str, int], index: int) -> frozenset[str]:
    """The groups (and ``host``) read at poll ``index`` (0 = the first poll on a connection,
    when everything is read): a group not in ``every`` at every poll, one in it every
    ``every[group]`` polls."""
    return frozenset(g for g in (*groups, "host") if index % every.get(g, 1) == 0)


def group_counts(stats: Mapping[str, Any]) -> dict[str, int]:
    """How many fields of each group one answer has (by :data:`GROUP_PREFIXES`)."""
    counts: dict[str, int] = {}
    for key in stats:
        group = _GROUP_BY_PREFIX.get(key.split(".", 1)[0] + ".")
        if group is not None:
            counts[group] = counts.get(group, 0) + 1
    return counts


def carried_fields(previous: Mapping[str, Any], groups: Iterable[str]) -> dict[str, Any]:
    """The fields of ``groups`` in ``previous`` (one guest's last answer), to stand in
    for a poll that did not read those groups."""
    prefixes = tuple(GROUP_PREFIXES[g] for g in groups if g in GROUP_PREFIXES)
    return {k: v for k, v in previous.items() if k.startswith(prefixes)} if prefixes else {}


def has_figures(stats: Mapping[str, Any]) -> bool:
    """True when an answer is of a guest that has figures to keep: active by
    ``state.state`` (running, blocked, paused, shutting down, crashed but kept,
    pmsuspended), or, without the state group, with any field. A stopped guest's
    answer is its state alone, and its last run's figures must not stand in."""
    state = stats.get("state.state")
    if state is None:
        return bool(stats)
    return state not in (libvirt.VIR_DOMAIN_NOSTATE, libvirt.VIR_DOMAIN_SHUTOFF)
