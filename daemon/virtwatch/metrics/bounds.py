"""Bounds on what ``/metrics`` exposes (pure functions): the series budget and label-value caps.

Series budget (``metrics.max_series``; 0, the default, means none). Prometheus' own
``sample_limit`` is all or nothing: one host over it loses its whole scrape. Instead, when
the exposition would pass the budget, whole *tiers* of the guest families are left out,
lowest value first, until it fits:

1. ``vcpu``: per-vCPU time, wait and delay (``libvirt_domain_vcpu_*_seconds_total``; the
   guest's ``cpu_time`` stays);
2. ``device_detail``: per-device requests, times, packets, errors and drops
   (``libvirt_domain_block_*_requests_total``, ``…_time_seconds_total``,
   ``libvirt_domain_interface_*_packets_total``, ``…_errors_total``, ``…_drops_total``);
3. ``device``: the remaining per-device families: bytes, sizes and the ``block_info`` and
   ``interface_info`` families.

State, identity and host families (``libvirt_domain_info``, ``…_state_code``, ``libvirt_host_info``,
``libvirt_domains``, …) and the daemon's own metrics are never left out: a host still over
budget with every tier gone exposes them all (and says so in its warning). A tier goes as a
whole, for every guest at once, so no guest's series come and go with its neighbours'.

Label values that come from guests or their definitions (agent strings, domain names, disk
paths, mount points) are capped at :data:`MAX_LABEL_VALUE_CHARS` characters: a longer one
keeps its first characters and ends in ``~`` and 8 hex digits of its SHA-1, so two long
values that share a beginning stay two series.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import Metric

from .domain import BLOCK_FIELDS, NET_FIELDS, VCPU_FIELDS

#: Longest label value exposed, in characters (``~`` and the 8-digit hash included).
MAX_LABEL_VALUE_CHARS = 128
_HASH_CHARS = 8

_P = "libvirt_domain_"
_DETAIL_SUFFIXES = ("_requests_total", "_time_seconds_total", "_packets_total", "_errors_total", "_drops_total")
_DEVICE = (tuple(_P + suffix + ("_total" if kind == "counter" else "") for _k, suffix, kind, *_r in BLOCK_FIELDS)
           + tuple(_P + suffix + "_total" for _k, suffix, _d in NET_FIELDS))

#: (tier name, families) in the order they are left out; families by their exposition
#: names (the ``# TYPE`` line's: a counter's ends in ``_total``, as :func:`exposed_name` gives).
TIERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("vcpu", frozenset(_P + suffix + "_total" for _k, suffix, *_rest in VCPU_FIELDS)),
    ("device_detail", frozenset(f for f in _DEVICE if f.endswith(_DETAIL_SUFFIXES))),
    ("device", frozenset(f for f in _DEVICE if not f.endswith(_DETAIL_SUFFIXES))
     | {_P + "block_info", _P + "interface_info"}),
)


def exposed_name(family: Metric) -> str:
    """The family's name in the text exposition (prometheus-client writes a counter's
    ``# TYPE`` line with ``_total``)."""
    return family.name + "_total" if family.type == "counter" else family.name


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetPlan:
    """What one render exposes under the budget.

    Attributes:
        tiers: names of the tiers left out, in :data:`TIERS` order (empty: none).
        dropped: series left out, by family.
        exposed: series exposed in total (``other`` included).
        met: False when even without every tier the exposition passes the budget.
    """

    tiers: tuple[str, ...] = ()
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    exposed: int = 0
    met: bool = True


def plan_budget(counts: Mapping[str, int], max_series: int, other: int = 0) -> BudgetPlan:
    """The tiers to leave out so that ``other + sum(counts)`` fits ``max_series``.

    Args:
        counts: series per family of the guest and host families (:func:`exposed_name` → series).
        max_series: the budget; 0 or less means none (nothing is left out).
        other: series of families the budget never drops (the daemon's own, components').
    """
    exposed = other + sum(counts.values())
    tiers: list[str] = []
    dropped: dict[str, int] = {}
    if max_series > 0:
        for name, families in TIERS:
            if exposed <= max_series:
                break
            tiers.append(name)
            for family in sorted(families):
                n = counts.get(family, 0)
                if n:
                    dropped[family] = n
                    exposed -= n
    return BudgetPlan(tuple(tiers), dropped, exposed, max_series <= 0 or exposed <= max_series)


def cap_label_value(value: str, cap: int = MAX_LABEL_VALUE_CHARS) -> str:
    """``value``, or its first ``cap - 9`` characters + ``~`` + 8 hex digits of its SHA-1
    when it is longer than ``cap`` characters (``cap`` must be over 9)."""
    if len(value) <= cap:
        return value
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{value[:cap - _HASH_CHARS - 1]}~{digest}"


def cap_labels(families: Iterable[Metric], cap: int = MAX_LABEL_VALUE_CHARS) -> Iterator[Metric]:
    """The families with every label value passed through :func:`cap_label_value`
    (a family without a long value is yielded as it is)."""
    for family in families:
        if any(len(v) > cap for s in family.samples for v in s.labels.values()):
            family.samples = [s._replace(labels={k: cap_label_value(v, cap) for k, v in s.labels.items()})
                              for s in family.samples]
        yield family


def count_series(text: bytes) -> dict[str, int]:
    """Series per family in a Prometheus text exposition: the sample lines after each
    ``# TYPE`` line (a histogram's buckets, sum and count are series of its family);
    samples before any ``# TYPE`` count under their metric name."""
    counts: dict[str, int] = {}
    family = ""
    for line in text.split(b"\n"):
        if not line:
            continue
        if line.startswith(b"#"):
            if line.startswith(b"# TYPE "):
                family = line.split(b" ", 3)[2].decode()
                counts.setdefault(family, 0)
            continue
        key = family or line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
        counts[key] = counts.get(key, 0) + 1
    return counts
