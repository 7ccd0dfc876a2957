"""The living demo's pure pieces and its refusal of anything but libvirt's test driver."""

from __future__ import annotations

import libvirt
import pytest
from prometheus_client import CollectorRegistry

from virtwatch.config import ConfigError, DemoSettings, load_settings, wants_read_only
from virtwatch.demo import DISTURBANCES, LivingDemo, next_action
from virtwatch.metrics.instruments import Instruments
from virtwatch.virt.calls import Calls

RUNNING, PAUSED, SHUTOFF, CRASHED = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                                     libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)


def test_a_guest_that_is_down_comes_back_first() -> None:
    assert next_action({"b": RUNNING, "a": PAUSED}, turn=7) == ("a", "resume")
    assert next_action({"b": SHUTOFF, "a": RUNNING}, turn=0) == ("b", "start")
    assert next_action({"c": CRASHED}, turn=0) == ("c", "start")
    assert next_action({}, turn=0) is None
    assert next_action({"a": libvirt.VIR_DOMAIN_PMSUSPENDED}, turn=0) is None  # nothing the demo does


def test_disturbances_rotate_over_guests_and_actions() -> None:
    """Driven against its own model of the guests: every pair of guest and disturbance
    comes up, every disturbance is undone by the next action, and at most one guest is
    ever down."""
    states = dict.fromkeys(("web1", "web2", "db1", "batch1", "build-runner"), RUNNING)
    after = {"pause": PAUSED, "shutdown": SHUTOFF, "destroy": SHUTOFF, "resume": RUNNING, "start": RUNNING}
    turn, seen = 0, set()
    for _ in range(30):
        pick = next_action(states, turn)
        assert pick is not None
        guest, action = pick
        if action in DISTURBANCES:
            seen.add(pick)
            turn += 1
        states[guest] = after[action]
        assert sum(s != RUNNING for s in states.values()) <= 1
    assert seen == {(g, a) for g in states for a in DISTURBANCES}  # 5 guests x 3 disturbances in 15 turns


def test_the_pause_between_actions_follows_the_settings() -> None:
    calls = Calls(Instruments(CollectorRegistry()), 1)
    try:
        values = iter([0.0, 0.5, 0.999])
        demo = LivingDemo(DemoSettings(enabled=True, min_interval=10, max_interval=20), "test:///default", calls,
                          rand=lambda: next(values))
        assert [round(demo.delay(), 2) for _ in range(3)] == [10.0, 15.0, 19.99]
    finally:
        calls.shutdown()


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+ssh://hv1/system", "test+unix:///default",
                                 "test://remote.example.org/default", "lxc:///"])
def test_the_demo_refuses_anything_but_the_in_process_test_driver(uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"demo.enabled": True, "libvirt.uri": uri})
    assert len(err.value.errors) == 1
    assert err.value.errors[0].startswith("demo.enabled: ") and repr(uri) in err.value.errors[0]
    calls = Calls(Instruments(CollectorRegistry()), 1)
    try:
        with pytest.raises(ValueError, match="test driver"):
            LivingDemo(DemoSettings(enabled=True), uri, calls)
    finally:
        calls.shutdown()
    load_settings(None, {"demo.enabled": False, "libvirt.uri": uri})  # off: any URI


def test_demo_settings() -> None:
    for uri in ("test:///default", "test:///home/me/virtwatch/config/demo-host.xml"):
        s = load_settings(None, {"demo.enabled": True, "libvirt.uri": uri})
        assert s.demo.enabled and wants_read_only(s) is False  # its actions need read-write
    assert load_settings(None).demo.enabled is False
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"demo.enabled": True, "libvirt.uri": "test:///default", "libvirt.read_only": "yes"})
    assert [e.split(":")[0] for e in err.value.errors] == ["demo.enabled"]
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"demo.min_interval": 20, "demo.max_interval": 10})
    assert err.value.errors == ["demo: max_interval must not be shorter than min_interval"]
