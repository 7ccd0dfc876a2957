"""Instant alerts from a daemon with policy: what the alert carries about the policy's decision.

The daemon runs in this process on the test driver; alerts go to a real Alertmanager.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import libvirt

from testkit import until, until_sync
from virtwatch.app import Daemon
from virtwatch.config import settings_from_mapping
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl


async def test_a_crash_alert_carries_the_policys_restart_decision(
        event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path, make_guests: Any, alertmanagers: Any) -> None:
    """The policy restarts a crashed guest (no alert of its own): the event's
    VirtwatchGuestCrashed still gets the decision as its ``decision`` annotation, as the
    runbook promises."""
    am = alertmanagers[0]
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    d = Daemon(settings_from_mapping({
        "libvirt": {"uri": "test:///default"}, "http": {"listen": "127.0.0.1:0"}, "log": {"events": False},
        "alerts": {"alertmanager_urls": [am.url], "instance": "hv-dec", "min_firing_duration": 0.0},
        "daemon": {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "vw.sock"),
                   "boot_id_file": str(boot_id)},
        "policy": {"enabled": True, "debounce": 0.05, "boot_settle_quiet": 0.1, "boot_settle_timeout": 1.0,
                   "match": [{"glob": "dec-*", "restart_delay": 0.2}]},
    }), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "dec", 1, True)
        name = dom.name()
        await until(lambda: name in d.policy.engine.snapshot().guests, 10, "policy knows the guest")
        await until(lambda: d.policy_side.conn is not None, 10, "policy connection open")
        await asyncio.to_thread(dom.coreDump, str(tmp_path / "core"), libvirt.VIR_DUMP_CRASH)  # STOPPED/CRASHED
        alerts = await asyncio.to_thread(lambda: until_sync(
            lambda: [a for a in am.alerts(alertname="VirtwatchGuestCrashed", domain=name)
                     if "decision" in a["annotations"]], 15))
        assert alerts[0]["annotations"]["decision"].startswith(f"restart {name}: crash, attempt 1/")
        await until(lambda: d.guests.by_name(name).state == libvirt.VIR_DOMAIN_RUNNING, 10, "restarted")
    finally:
        await d.stop()
