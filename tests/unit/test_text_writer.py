"""Golden tests: metrics/text.write_text writes exactly what prometheus-client writes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)

from virtwatch.metrics.collector import StateCollector
from virtwatch.metrics.text import FamilyTexts, write_text
from virtwatch.state import GuestRegistry, ResyncEntry
from virtwatch.virt.stats import DomainStats, Snapshot

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "domstats-libvirt9-qemu7.2.json"


class Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def library(families: list[Metric]) -> bytes:
    return generate_latest(Families(families))  # type: ignore[arg-type]


def recorded_families(copies: int) -> list[Metric]:
    """Every guest and host family of ``copies`` × the recorded real getAllDomainStats answers."""
    real = json.loads(RECORDED.read_text())["domains"]
    guests, entries, doms = GuestRegistry(), [], {}
    for i in range(copies * len(real)):
        st = real[i % len(real)]["stats"]
        name, u = f"guest-{i:03d}", str(uuid.UUID(int=i))
        entries.append(ResyncEntry(name, u, st["state.state"], st["state.reason"], True, i % 2 == 0))
        doms[u] = DomainStats(name, u, st, i % 3 == 0, 1_700_000_000.0 + i)
    guests.apply_resync(entries, 0)
    snap = Snapshot(1, time.time(), 0.01, doms, None)
    return list(StateCollector(guests, lambda: snap, lambda: {"libvirt_version": "9.0.0"}).frozen().collect())


def test_the_recorded_real_statistics_render_to_the_same_bytes() -> None:
    families = recorded_families(3)
    assert sum(len(f.samples) for f in families) > 300
    assert write_text(families) == library(families)


ODD_VALUES = [0, 1, -1, 0.5, -0.0, 1e-9, 999999.0, 1000000.0, 1234567.0, 12345678.9, 1e16, 1.5e300,
              12345678901234567890, -12345678.0, float("inf"), float("-inf"), float("nan"), True, 7 / 3]


def test_odd_names_labels_and_family_kinds_render_to_the_same_bytes() -> None:
    g = GaugeMetricFamily("odd_gauge", 'doc with \\ backslash\nand newline and "quotes"',
                          labels=["zeta", "alpha", "domain"])
    for i, v in enumerate(ODD_VALUES):
        g.add_metric([f'quote " {i}', "back\\slash\nnewline", "ünïcödé ✓ guest"], v)
    g.add_metric(["", "", ""], 1, timestamp=1_700_000_000.123)
    plain = GaugeMetricFamily("unlabelled", "no labels", value=3)
    c = CounterMetricFamily("odd_events", "a counter", labels=["domain"], created=1.5)
    c.add_metric(["a"], 5, created=1_700_000_000.5)
    c.add_metric(["b"], 6)
    info = InfoMetricFamily("odd_build", "an info", labels=["host"])
    info.add_metric(["h1"], {"version": "1.2", "commit": "abc"})
    stateset = StateSetMetricFamily("odd_state", "a stateset", labels=["domain"])
    stateset.add_metric(["a"], {"on": True, "off": False})
    hist = HistogramMetricFamily("odd_seconds", "a histogram", labels=["call"])
    hist.add_metric(["x"], [("0.1", 1), ("1.0", 3), ("+Inf", 4)], sum_value=2.5)
    ghist = GaugeHistogramMetricFamily("odd_gh", "a gauge histogram", buckets=[("1.0", 2), ("+Inf", 3)],
                                       gsum_value=4.0)
    summary = SummaryMetricFamily("odd_summary", "a summary", count_value=3, sum_value=1.5)
    unknown = UnknownMetricFamily("odd_unknown", "untyped", value=1)
    families = [g, plain, c, info, stateset, hist, ghist, summary, unknown]
    assert write_text(families) == library(families)


def test_an_unformattable_value_raises_like_the_library() -> None:
    bad = GaugeMetricFamily("bad", "a string value", labels=["domain"])
    bad.add_metric(["a"], "not a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        library([bad])
    with pytest.raises(ValueError):
        write_text([bad])


def test_family_texts_reuse_only_what_did_not_change_and_write_the_library_bytes() -> None:
    reg = CollectorRegistry()
    scrapes = Counter("demo_scrapes", "scrapes answered", ["code"], registry=reg)
    level = Gauge("demo_level", "a level", registry=reg)
    seconds = Histogram("demo_seconds", "a duration", ["call"], buckets=(0.1, 1.0), registry=reg)
    scrapes.labels("200").inc()
    level.set(3)
    seconds.labels("x").observe(0.5)
    texts = FamilyTexts()
    assert texts.write(reg.collect()) == generate_latest(reg)
    assert texts.reused == 0
    # nothing changed: every family is reused
    assert texts.write(reg.collect()) == generate_latest(reg)
    assert texts.reused == 3
    # one counter child added, one gauge changed: those two families are written again
    scrapes.labels("500").inc()
    level.set(4.5)
    text = texts.write(reg.collect())
    assert text == generate_latest(reg)
    assert b'demo_scrapes_total{code="500"} 1.0' in text and b"demo_level 4.5" in text
    assert texts.reused == 3 + 1
    seconds.labels("x").observe(2)
    assert texts.write(reg.collect()) == generate_latest(reg)
    assert texts.reused == 4 + 2


def test_family_texts_write_a_family_again_when_its_help_or_type_changed() -> None:
    texts = FamilyTexts()
    first = GaugeMetricFamily("demo", "first help", value=1)
    assert texts.write([first]) == library([first])
    helped = GaugeMetricFamily("demo", "second help", value=1)
    assert texts.write([helped]) == library([helped])
    typed = UnknownMetricFamily("demo", "second help", value=1)
    assert texts.write([typed]) == library([typed])
    assert texts.reused == 0


def test_family_texts_raise_like_write_text_and_recover() -> None:
    texts = FamilyTexts()
    good = GaugeMetricFamily("good", "fine", value=1)
    bad = GaugeMetricFamily("bad", "a string value", labels=["domain"])
    bad.add_metric(["a"], "not a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        texts.write([good, bad])
    assert texts.write([good]) == library([good])
