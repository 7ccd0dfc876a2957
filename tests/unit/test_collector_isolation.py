"""A broken collector never fails the scrape: its families are left out and
``virtwatch_collector_success{collector}`` says which one broke (node_exporter's contract)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from structlog.testing import capture_logs

from testkit import sample
from virtwatch.metrics.collector import Exposition, StateCollector
from virtwatch.state import GuestRegistry, ResyncEntry
from virtwatch.virt.stats import HostStats, Snapshot


class Switchable:
    """A component collector: one gauge family ``family`` (value 1), or a RuntimeError while ``broken``."""

    def __init__(self, family: str, broken: bool = False) -> None:
        self.family = family
        self.broken = broken

    def collect(self) -> Iterator[Metric]:
        """Yield the family, or raise as a buggy collector does."""
        if self.broken:
            raise RuntimeError("collector bug")
        yield GaugeMetricFamily(self.family, "A test family.", value=1)

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


class UnrenderableLabel:
    """A collector whose ``collect`` succeeds but whose family cannot be rendered:
    a label value that is not a string (what a None ``intent`` would do to the policy collector)."""

    def collect(self) -> Iterator[Metric]:
        """Yield ``broken_info`` with a None label value, after one good sample."""
        fam = GaugeMetricFamily("broken_info", "A family with a bad label.", labels=["domain"])
        fam.add_metric(["good"], 1)
        fam.add_metric([None], 1)  # type: ignore[list-item]
        yield fam

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


def exposition(snapshot: Snapshot | None = None) -> tuple[Exposition, CollectorRegistry]:
    """An Exposition over one running guest and a live registry holding one counter (value 3)."""
    guests = GuestRegistry(clock=lambda: 0.0)
    guests.apply_resync([ResyncEntry("web1", "u-1", 1, 1, True, False)], started_after_seq=0)
    live = CollectorRegistry()
    Counter("libvirt_events", "Events.", registry=live).inc(3)
    return Exposition(live, StateCollector(guests, lambda: snapshot, lambda: {})), live


async def test_a_raising_collector_is_left_out_and_the_others_are_rendered() -> None:
    exp, _ = exposition()
    exp.add_collector("agent", Switchable("agent_family"))
    exp.add_collector("policy", Switchable("policy_family", broken=True))
    text = (await exp.render_async()).decode()
    assert sample(text, "libvirt_events_total") == 3
    assert sample(text, "agent_family") == 1
    assert sample(text, "libvirt_domain_state_code", domain="web1") == 1
    assert "policy_family" not in text
    assert sample(text, "virtwatch_collector_success", collector="policy") == 0
    assert sample(text, "virtwatch_collector_success", collector="agent") == 1
    assert sample(text, "virtwatch_collector_success", collector="state") == 1
    assert sample(text, "virtwatch_collector_success", collector="daemon") == 1
    assert exp.render().decode() == text  # the synchronous path says the same


async def test_a_family_that_cannot_be_rendered_is_left_out_whole() -> None:
    exp, _ = exposition()
    exp.add_collector("policy", UnrenderableLabel())
    text = (await exp.render_async()).decode()
    assert "broken_info" not in text  # not even its good first sample: no half-written family
    assert sample(text, "virtwatch_collector_success", collector="policy") == 0
    assert sample(text, "libvirt_events_total") == 3


async def test_a_broken_state_render_keeps_the_live_metrics_and_is_not_retried_per_scrape() -> None:
    bad_host = HostStats(node_info=("x86_64",), memory={}, cpu={}, pools=(), networks=())  # too short to unpack
    exp, _ = exposition(Snapshot(seq=1, time=100.0, duration=0.01, domains={}, host=bad_host))
    exp.add_collector("agent", Switchable("agent_family"))
    first = (await exp.render_async()).decode()
    second = (await exp.render_async()).decode()
    assert first == second
    assert exp.renders == 1  # same inputs, same failure: rendered once per change, like a good render
    assert sample(first, "virtwatch_collector_success", collector="state") == 0
    assert "libvirt_domain_state_code" not in first
    assert sample(first, "libvirt_events_total") == 3 and sample(first, "agent_family") == 1


async def test_a_broken_live_registry_collector_still_gives_a_scrape() -> None:
    exp, live = exposition()
    live.register(Switchable("registered_directly", broken=True))
    text = (await exp.render_async()).decode()
    assert sample(text, "virtwatch_collector_success", collector="daemon") == 0
    assert sample(text, "virtwatch_collector_success", collector="state") == 1
    assert sample(text, "libvirt_domain_state_code", domain="web1") == 1


async def test_failure_and_recovery_are_logged_once_per_change_not_per_scrape() -> None:
    exp, _ = exposition()
    policy = Switchable("policy_family")
    exp.add_collector("policy", policy)
    with capture_logs() as logs:
        await exp.render_async()  # healthy from the start: nothing to say
        policy.broken = True
        for _ in range(3):
            await exp.render_async()
        policy.broken = False
        for _ in range(2):
            await exp.render_async()
        policy.broken = True
        await exp.render_async()
    seen = [(e["event"], e["log_level"], e["collector"]) for e in logs if e["event"].startswith("collector_")]
    assert seen == [("collector_failed", "error", "policy"), ("collector_recovered", "info", "policy"),
                    ("collector_failed", "error", "policy")]
    failed = next(e for e in logs if e["event"] == "collector_failed")
    assert failed["error"] == "RuntimeError('collector bug')"


def test_collector_names_are_unique() -> None:
    exp, _ = exposition()
    exp.add_collector("agent", Switchable("a"))
    for taken in ("agent", "state", "daemon"):
        try:
            exp.add_collector(taken, Switchable("b"))
        except ValueError as err:
            assert taken in str(err)
        else:
            raise AssertionError(f"{taken!r} accepted twice")


async def test_state_inputs_that_cannot_be_read_still_give_a_scrape() -> None:
    guests = GuestRegistry(clock=lambda: 0.0)

    def info() -> dict[str, object]:
        raise RuntimeError("connection info unavailable")

    live = CollectorRegistry()
    Counter("libvirt_events", "Events.", registry=live).inc(3)
    exp = Exposition(live, StateCollector(guests, lambda: None, info))
    for text in ((await exp.render_async()).decode(), exp.render().decode()):
        assert sample(text, "virtwatch_collector_success", collector="state") == 0
        assert sample(text, "libvirt_events_total") == 3
