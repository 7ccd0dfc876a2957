"""stats.group_intervals: which groups a poll reads, and what stands in for the others."""

from __future__ import annotations

import libvirt
import pytest

from virtwatch.config import ConfigError, load_settings
from virtwatch.virt.groups import carried_fields, due_groups, group_counts, has_figures, polls_per_read

GROUPS = ("state", "cpu", "balloon", "vcpu", "interface", "block")


def test_default_reads_balloon_vcpu_and_host_every_fourth_poll() -> None:
    stats = load_settings(None, {}).stats
    assert stats.effective_group_intervals == {"balloon": 60.0, "vcpu": 60.0, "host": 60.0}
    every = polls_per_read(stats.effective_group_intervals, stats.poll_interval)
    assert every == {"balloon": 4, "vcpu": 4, "host": 4}
    read = [sorted(due_groups(GROUPS, every, i)) for i in range(5)]
    everything = sorted((*GROUPS, "host"))
    often = sorted(["state", "cpu", "interface", "block"])
    assert read == [everything, often, often, often, everything]


def test_the_default_follows_the_poll_interval_and_an_empty_table_reads_everything() -> None:
    assert load_settings(None, {"stats.poll_interval": 1.0}).stats.effective_group_intervals["vcpu"] == 4.0
    stats = load_settings(None, {"stats.group_intervals": {}}).stats
    assert stats.effective_group_intervals == {}
    assert due_groups(GROUPS, polls_per_read({}, 15.0), 7) == frozenset((*GROUPS, "host"))


def test_intervals_round_to_whole_polls_and_never_below_one() -> None:
    assert polls_per_read({"block": 40.0, "cpu": 5.0, "host": 300.0}, 15.0) == {"block": 3, "cpu": 1, "host": 20}


@pytest.mark.parametrize(("table", "message"), [
    ({"perf": 30.0}, "group_intervals names 'perf', which is not in stats.groups"),
    ({"vcpu": 0}, "group_intervals: vcpu: 0.0 is not in (0, 86400] seconds"),
    ({"disk": 30.0}, "unknown group 'disk'"),
])
def test_bad_intervals_are_refused_by_name(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_settings(None, {"stats.group_intervals": table})


ANSWER = {"state.state": 1, "state.reason": 1, "cpu.time": 5, "balloon.current": 65536, "balloon.rss": 100,
          "vcpu.current": 1, "vcpu.0.time": 7, "net.count": 0, "block.count": 1, "block.0.rd.bytes": 9}


def test_carried_fields_are_those_of_the_groups_named() -> None:
    assert carried_fields(ANSWER, ("balloon", "vcpu")) == {
        "balloon.current": 65536, "balloon.rss": 100, "vcpu.current": 1, "vcpu.0.time": 7}
    assert carried_fields(ANSWER, ("interface",)) == {"net.count": 0}
    assert carried_fields(ANSWER, ()) == {}


def test_group_counts_count_fields_per_group() -> None:
    assert group_counts(ANSWER) == {"state": 2, "cpu": 1, "balloon": 2, "vcpu": 2, "interface": 1, "block": 2}
    assert group_counts({"odd.key": 1}) == {}


def test_only_an_active_guests_answer_has_figures_to_carry() -> None:
    assert has_figures({"state.state": libvirt.VIR_DOMAIN_RUNNING, "state.reason": 1})
    assert has_figures({"state.state": libvirt.VIR_DOMAIN_PAUSED, "state.reason": 1})
    assert not has_figures({"state.state": libvirt.VIR_DOMAIN_SHUTOFF, "state.reason": 2})
    assert not has_figures({"state.state": libvirt.VIR_DOMAIN_NOSTATE})
    assert has_figures({"cpu.time": 1})  # no state group read: any field counts
    assert not has_figures({})


@pytest.mark.parametrize("value", ["60", True])
def test_interval_values_are_numbers_strictly(value: object) -> None:
    """A quoted number or a boolean is refused, as everywhere else in the config."""
    with pytest.raises(ConfigError, match=r"group_intervals\.balloon"):
        load_settings(None, {"stats.group_intervals": {"balloon": value}})


@pytest.mark.parametrize("label", ["delivery", "instance", "alertname"])
def test_labels_virtwatch_sets_itself_are_refused(label: str) -> None:
    with pytest.raises(ConfigError, match="set by virtwatch itself"):
        load_settings(None, {"alerts.labels": {label: "x"}})
