"""Liveness wired into the daemon (in this process, on the test driver, alerts to a real
Alertmanager): a probe that keeps failing is alerted, decided by the policy, restarted, and
``virtwatch explain`` shows the probe results.

The test driver has no guest agent (``virDomainQemuAgentCommand`` is refused with
``VIR_ERR_NO_SUPPORT``): every probe fails with ``agent_error``, which is what this test needs.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from testkit import sample, until, until_sync
from virtwatch.app import Daemon
from virtwatch.config import settings_from_mapping
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl


async def test_failing_probe_alerts_and_the_policy_restarts_the_guest(
        event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path, make_guests: Any, alertmanagers: Any) -> None:
    am = alertmanagers[0]
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    d = Daemon(settings_from_mapping({
        "libvirt": {"uri": "test:///default"}, "http": {"listen": "127.0.0.1:0"}, "log": {"events": False},
        "alerts": {"alertmanager_urls": [am.url], "instance": "hv-live", "min_firing_duration": 60.0},
        "daemon": {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "vw.sock"),
                   "boot_id_file": str(boot_id)},
        "policy": {"enabled": True, "debounce": 0.05, "boot_settle_quiet": 0.1, "boot_settle_timeout": 1.0,
                   "match": [{"glob": "live-*", "probe": "agent_ping", "probe_interval": 0.5,
                              "probe_failure_threshold": 2, "probe_initial_delay": 0.0, "probe_timeout": 1.0,
                              "on_probe_failure": "restart", "restart_delay": 0.2, "restart_jitter": 0.0,
                              "restart_backoff": 1.0,
                              "limit_burst": 100}]},
    }), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        await until(lambda: d.agent_side.conn is not None and d.policy_side is not None
                    and d.policy_side.conn is not None, 10, "agent and policy connections open")
        (dom,) = await asyncio.to_thread(make_guests, "live", 1, True)
        name = dom.name()
        # the alert stays in Alertmanager (min_firing_duration) though the restart resolved it
        alerts = await asyncio.to_thread(lambda: until_sync(
            lambda: [a for a in am.alerts(alertname="VirtwatchProbeFailed", domain=name)
                     if "decision" in a["annotations"]], 15))
        ann = alerts[0]["annotations"]
        assert ann["cause"] == "probe_failed"
        assert ann["description"] == (f"{name}: probe_failed: 2 consecutive agent_ping probes failed, last: "
                                      "agent_error (VIR_ERR_NO_SUPPORT)")
        assert re.fullmatch(rf"kill and restart {name}: probe_failed, attempt \d+/100, in 0.2 s, "
                            r"policy on_probe_failure from match\[0\] \(glob=live-\*\)", ann["decision"]), ann
        await until(lambda: d.policy.engine.snapshot().guests[name].restarts.get("probe_failed", 0) >= 1, 10,
                    "restart counted")
        await until(lambda: d.guests.by_name(name).state == 1, 10, "running again")
        explain = d.control_explain(name)
        assert explain["liveness"]["probe"] == "agent_ping"
        assert any(line.startswith("  probe at ") and "FAIL agent_error (VIR_ERR_NO_SUPPORT)" in line
                   for line in explain["lines"]), explain["lines"]
        text = (await d.exposition.render_async()).decode()
        failed = sample(text, "libvirt_domain_probe_failures_total", domain=name, probe="agent_ping",
                        reason="agent_error")
        assert failed is not None and failed >= 2
        assert sample(text, "libvirt_domain_probe_success", domain=name, probe="agent_ping") == 0
    finally:
        await d.stop()
