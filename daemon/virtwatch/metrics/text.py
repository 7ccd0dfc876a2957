"""A faster writer of the Prometheus text format 0.0.4 for the guest families.

:func:`write_text` writes, byte for byte, what ``prometheus_client.generate_latest``
writes for the same families (``tests/unit/test_text_writer.py`` proves it on the
recorded real statistics and on odd names and values), in about two thirds of the time
(``bench/run_all.py``): prometheus-client escapes and validates every label name and
value of every sample and sorts every sample's labels; this writer does each once per
distinct string or label set of a render. The daemon's own metrics still go through
prometheus-client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name
from prometheus_client.utils import floatToGoString

_TYPES = {"counter": ("_total", "counter"), "info": ("_info", "gauge"), "stateset": ("", "gauge"),
          "gaugehistogram": ("", "histogram"), "unknown": ("", "untyped")}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


def go_float(value: Any) -> str:
    """``prometheus_client.utils.floatToGoString``, typed: Python's ``repr`` of the float, with
    Go's exponent form for positive values of 10**6 and more. (An inlined copy measured no
    faster: label escaping, not values, is what this module saves.)"""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: backslash, newline and ``"`` escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def write_text(families: Iterable[Any]) -> bytes:
    """The families (prometheus-client ``Metric`` objects) in the text format, UTF-8: the
    bytes ``generate_latest`` writes for them. Raises what formatting a bad value raises
    (``ValueError``, ``TypeError``), as ``generate_latest`` does. Safe in any thread."""
    names: dict[str, str] = {}
    orders: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    values: dict[str, str] = {}
    out: list[str] = []

    def metric_name(name: str) -> str:
        escaped = names.get(name)
        if escaped is None:
            escaped = names[name] = escape_metric_name(name, UNDERSCORES)
        return escaped

    def line(sample: Any) -> str:
        labels = sample.labels
        if labels:
            keys = tuple(labels)
            order = orders.get(keys)
            if order is None:
                order = orders[keys] = [(k, escape_label_name(k, UNDERSCORES)) for k in sorted(keys)]
            parts = []
            for k, escaped_k in order:
                v = labels[k]
                ev = values.get(v)
                if ev is None:
                    ev = values[v] = escape_label_value(v)
                parts.append(f'{escaped_k}="{ev}"')
            series = f"{metric_name(sample.name)}{{{','.join(parts)}}}"
        else:
            series = metric_name(sample.name)
        timestamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
        return f"{series} {go_float(sample.value)}{timestamp}\n"

    for metric in families:
        suffix, mtype = _TYPES.get(metric.type, ("", metric.type))
        mname = metric_name(metric.name + suffix)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        om: dict[str, list[str]] = {}
        om_names = {metric.name + s: s for s in _OM_SUFFIXES}
        for sample in metric.samples:
            om_suffix = om_names.get(sample.name)
            if om_suffix is None:
                out.append(line(sample))
            else:  # OpenMetrics-only samples, written as gauges after the family
                om.setdefault(om_suffix, []).append(line(sample))
        for om_suffix, lines in sorted(om.items()):
            om_name = metric_name(metric.name + om_suffix)
            out.append(f"# HELP {om_name} {doc}\n# TYPE {om_name} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


class _Written(NamedTuple):
    """One family as :class:`FamilyTexts` last wrote it: what it was written from, and the bytes."""

    type: str
    documentation: str
    samples: list[Any]
    text: bytes


class FamilyTexts:
    """:func:`write_text` with a memory of the last call: a family whose type, help and
    samples (names, labels, values, timestamps) equal those it had then is not formatted
    again; its bytes are reused. For families written again and again, most of which do not
    change in between: the daemon's own at every scrape, the host families at every render.
    The bytes are those :func:`write_text` writes for the same families (the text of a list
    of families is the concatenation of each family's). Keeps one entry per family name of
    the last call. Entries are immutable and replaced whole, so calls from two threads at
    once still write the right bytes (they may only format a family again)."""

    def __init__(self) -> None:
        self._last: dict[str, _Written] = {}
        self.reused = 0  # families not formatted again, since creation

    def write(self, families: Iterable[Any]) -> bytes:
        """The families' text (as :func:`write_text`; raises what it raises)."""
        last, seen = self._last, {}
        out: list[bytes] = []
        for metric in families:
            hit = last.get(metric.name)
            if (hit is not None and hit.samples == metric.samples and hit.type == metric.type
                    and hit.documentation == metric.documentation):
                self.reused += 1
            else:
                hit = _Written(metric.type, metric.documentation, metric.samples, write_text([metric]))
            seen[metric.name] = hit
            out.append(hit.text)
        self._last = seen
        return b"".join(out)
