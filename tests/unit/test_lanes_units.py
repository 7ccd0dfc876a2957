"""Pure decisions behind lanes: which URIs share the main connection, which guests look stuck."""

from __future__ import annotations

import libvirt
import pytest

from virtwatch.virt.lanes import shares_main_connection
from virtwatch.virt.stats import ControlState, stuck_guests


@pytest.mark.parametrize("uri, shared", [
    ("qemu:///system", False),
    ("qemu+unix:///system?socket=/run/x/libvirt-sock", False),
    ("test:///default", False),
    ("test:///default/", False),
    ("test:///home/me/demo-host.xml", True),
    ("test:///tmp/host.xml?x=1", True),
])
def test_shares_main_connection(uri: str, shared: bool) -> None:
    assert shares_main_connection(uri) is shared


def test_stuck_guests_by_control_state() -> None:
    states = {
        "a": ControlState("a", "a", libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, 1967),  # behind a stuck call
        "b": ControlState("b", "b", libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, 3),     # a quick command of someone
        "c": ControlState("c", "c", libvirt.VIR_DOMAIN_CONTROL_OK, 0),
        "d": ControlState("d", "d", libvirt.VIR_DOMAIN_CONTROL_JOB, 60_000),     # e.g. a migration: NOWAIT copes
        "e": ControlState("e", "e", libvirt.VIR_DOMAIN_CONTROL_ERROR, 0),        # libvirt: stuck in a job
    }
    assert stuck_guests(states, min_ms=1000) == {"a", "e"}
    assert stuck_guests(states, min_ms=0) == {"a", "b", "e"}
    assert stuck_guests({}, min_ms=0) == set()
