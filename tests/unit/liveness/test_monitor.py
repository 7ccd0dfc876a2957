"""The liveness monitor on a real guest table and a real (unsent) Alerter, with a scripted agent
and a fake clock: schedule, thresholds, alerts fired and resolved, reports, metrics."""

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from testkit import sample
from virtwatch.agent.lane import AgentError
from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.config import AlertSettings
from virtwatch.liveness.monitor import LivenessMonitor, explain_lines
from virtwatch.model import Event
from virtwatch.policy.clock import FakeClock
from virtwatch.policy.config import GuestPolicy
from virtwatch.state import GuestRegistry
from virtwatch.virt.stats import DomainStats

POLICY = {
    "web": GuestPolicy(probe="agent_ping", probe_interval=2, probe_failure_threshold=3, probe_initial_delay=10,
                       on_probe_failure="restart"),
    "db": GuestPolicy(capture_console=True, reboot_limit=2, reboot_interval=60, hang_after=5),
}


class Agent:
    """Answers guest-ping at once: ``ok``, an unresponsive agent, or ``our_side`` (an AgentError code
    about virtwatch's own connection)."""

    def __init__(self) -> None:
        self.ok = True
        self.our_side: str | None = None
        self.sent: list[str] = []

    async def agent_command(self, name: str, command: str, timeout: float) -> str:
        self.sent.append(name)
        if self.our_side:
            raise AgentError(self.our_side, "no agent connection")
        if not self.ok:
            raise AgentError("VIR_ERR_AGENT_UNRESPONSIVE")
        return '{"return": {}}'


class Rig:
    """The monitor, and the policy port it reports to."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.guests = GuestRegistry(self.clock.time)
        self.alerter = Alerter(AlertSettings(), CollectorRegistry())
        self.agent = Agent()
        self.reports: list[tuple[str, str, str]] = []
        self.ours: str | None = None
        self.seq = 0
        self.selection_listeners: list = []
        self.mon = LivenessMonitor(self.agent, self.guests, lambda n: POLICY.get(n, GuestPolicy()), self.alerter,
                                   policy=self, mono=self.clock.monotonic, wall=self.clock.time)

    # the policy port (the engine's side): failures reported, our own operation
    def on_liveness(self, name: str, cause: str, detail: str) -> None:
        self.reports.append((name, cause, detail))

    def own_operation(self, name: str) -> str | None:
        return self.ours

    def event(self, name: str, kind: str, event: str, detail: str = "") -> None:
        self.seq += 1
        ev = Event(self.clock.time(), self.seq, "domain", kind, name, "u-" + name, event, detail)
        self.guests.on_event(ev)
        self.mon.on_event(ev)

    async def tick(self, seconds: float) -> list[str]:
        """Move the clock by ``seconds``, schedule, and let the probes end."""
        await self.clock.advance(seconds)
        probed = self.mon.schedule()
        for _ in range(20):
            await asyncio.sleep(0)
        return probed

    def firing(self) -> set[tuple[str, str]]:
        return set(self.alerter.active)

    def metric(self, name: str, **labels: str) -> float | None:
        reg = CollectorRegistry()
        reg.register(self.mon.collector)
        return sample(generate_latest(reg).decode(), name, **labels)


async def test_probes_start_after_the_initial_delay_and_repeat_every_interval() -> None:
    r = Rig()
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    r.event("db", "lifecycle", "STARTED", "BOOTED")  # probe = none: never probed
    assert await r.tick(9.9) == []
    assert await r.tick(0.2) == ["web"]
    assert await r.tick(1.0) == []
    assert await r.tick(1.0) == ["web"]
    assert r.agent.sent == ["web", "web"]
    assert r.metric("libvirt_domain_probe_success", domain="web", probe="agent_ping") == 1.0
    assert r.metric("libvirt_domain_probe_success", domain="db") is None


async def test_threshold_failures_alert_once_report_once_and_a_pass_resolves() -> None:
    r = Rig()
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    await r.tick(10)
    r.agent.ok = False
    for _ in range(2):
        await r.tick(2)
    assert r.reports == [] and r.firing() == set()
    await r.tick(2)
    assert r.firing() == {("VirtwatchProbeFailed", "web")}
    assert r.reports == [("web", "probe_failed", "3 consecutive agent_ping probes failed, last: agent_unavailable "
                                                 "(VIR_ERR_AGENT_UNRESPONSIVE)")]
    await r.tick(2)
    assert len(r.reports) == 1  # the fourth failure declares nothing new
    assert r.metric("libvirt_domain_probe_failures_total", domain="web", probe="agent_ping",
                    reason="agent_unavailable") == 4
    assert r.metric("libvirt_domain_liveness_failures_total", domain="web", cause="probe_failed") == 1
    lines = explain_lines(r.mon.explain("web"))
    assert lines[0] == "liveness: probe agent_ping, 4/3 consecutive failures, next in 2.0 s"
    assert "FAIL agent_unavailable (VIR_ERR_AGENT_UNRESPONSIVE)" in lines[1]
    r.agent.ok = True
    await r.tick(2)
    assert r.firing() == set()
    assert r.mon.explain("web")["consecutive_failures"] == 0


async def test_a_stop_resolves_and_a_start_waits_the_initial_delay_again() -> None:
    r = Rig()
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    r.agent.ok = False
    for _ in range(4):
        await r.tick(10)
    assert r.firing() == {("VirtwatchProbeFailed", "web")}
    r.event("web", "lifecycle", "STOPPED", "DESTROYED")
    assert r.firing() == set()
    assert await r.tick(10) == []  # not running: not probed
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    assert await r.tick(5) == []
    assert await r.tick(5) == ["web"]


async def test_console_pattern_fires_once_per_boot_with_the_line() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")
    r.mon.on_console("db", b"[    1.0] booting\r\n[    9.1] BUG: kernel NULL pointer dereference, addr")
    r.mon.on_console("db", b"ess: 0000000000000000\r\n[    9.2] Kernel panic - not syncing: Fatal exception\r\n")
    assert r.reports == [("db", "console_panic", "[    9.1] BUG: kernel NULL pointer dereference, addr")]
    assert r.firing() == {("VirtwatchConsolePanic", "db")}
    r.event("db", "reboot", "REBOOT")  # the guest came back: resolved, matched again from now on
    assert r.firing() == set()
    r.mon.on_console("db", b"Oops: 0002 [#1] SMP\n")
    assert r.reports[-1] == ("db", "console_panic", "Oops: 0002 [#1] SMP")


async def test_reboot_loop_counts_guest_reboots_not_our_resets() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")
    r.ours = "reset"
    r.event("db", "reboot", "REBOOT")
    r.ours = None
    for _ in range(2):
        await r.clock.advance(5)
        r.event("db", "reboot", "REBOOT")
    assert r.reports == []
    await r.clock.advance(5)
    r.event("db", "reboot", "REBOOT")
    assert r.reports == [("db", "reboot_loop", "3 guest reboots within 60 s (reboot_limit 2)")]
    assert r.firing() == {("VirtwatchRebootLoop", "db")}
    assert r.metric("libvirt_domain_reboots_total", domain="db") == 4
    await r.tick(60)  # the window calmed down
    assert r.firing() == set()


def stats(name: str, cpu_s: float, io: int, at: float) -> dict[str, DomainStats]:
    return {"u-" + name: DomainStats(name, "u-" + name, {"cpu.time": int(cpu_s * 1e9), "vcpu.current": 1,
                                                          "block.0.wr.bytes": io}, False, at)}


async def test_busy_and_silent_for_hang_after_is_hung_until_io_moves() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")
    await r.clock.advance(60)  # past probe_initial_delay: the boot's grace
    for t in range(7):
        r.mon.on_snapshot(stats("db", 0.85 * t, 500, 100.0 + t))
    assert [c for _, c, _ in r.reports] == ["hung"]
    assert r.reports[0][2] == "vCPU at 0.85 s/s with no block or network I/O for 5 s (hang_after 5 s)"
    assert r.metric("libvirt_domain_hung", domain="db") == 1
    r.mon.on_snapshot(stats("db", 7.0, 900, 107.0))
    assert r.metric("libvirt_domain_hung", domain="db") == 0 and r.firing() == set()
    r.mon.on_snapshot(stats("web", 1.0, 0, 100.0))  # hang_after 0: not watched, no series
    assert r.metric("libvirt_domain_hung", domain="web") is None


async def test_undefined_guest_is_forgotten() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")
    r.mon.on_console("db", b"Kernel panic - not syncing: x\n")
    r.event("db", "lifecycle", "STOPPED", "DESTROYED")
    r.event("db", "lifecycle", "UNDEFINED", "REMOVED")
    assert r.mon.explain("db") is None and r.firing() == set()


async def test_probes_failing_on_our_side_say_nothing_about_the_guest() -> None:
    r = Rig()
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    await r.tick(10)
    for code in ("not_connected", "lane_busy") * 3:
        r.agent.our_side = code
        await r.tick(2)
    assert r.reports == [] and r.firing() == set()
    assert r.mon.explain("web")["consecutive_failures"] == 0
    assert r.metric("libvirt_domain_probe_failures_total", domain="web") is None
    assert r.metric("libvirt_domain_probe_success", domain="web", probe="agent_ping") == 1.0  # the last real one


async def test_no_hang_detection_while_a_guest_boots() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")  # db: probe_initial_delay 60 (the default)
    for t in range(50):
        r.mon.on_snapshot(stats("db", 0.9 * t, 0, 100.0 + t))
    assert r.reports == []
    await r.clock.advance(60)
    for t in range(50, 56):
        r.mon.on_snapshot(stats("db", 0.9 * t, 0, 100.0 + t))
    assert [c for _, c, _ in r.reports] == ["hung"]


async def test_a_selection_change_is_seen_at_once() -> None:
    r = Rig()
    assert r.selection_listeners == [r.mon.reselect]
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    assert r.mon.policy("web").probe == "agent_ping"
    POLICY["web"], old = GuestPolicy(), POLICY["web"]
    try:
        assert r.mon.policy("web").probe == "agent_ping"  # cached
        r.selection_listeners[0]("web")
        assert r.mon.policy("web").probe == "none"
    finally:
        POLICY["web"] = old


async def test_a_burst_of_reboot_events_is_one_reboot() -> None:
    r = Rig()
    r.event("db", "lifecycle", "STARTED", "BOOTED")
    for _ in range(3):
        for _ in range(5):  # one guest reboot: five REBOOT events within 60 ms (measured)
            r.event("db", "reboot", "REBOOT")
            await r.clock.advance(0.015)
        await r.clock.advance(8)
    assert r.metric("libvirt_domain_reboots_total", domain="db") == 3
    assert r.reports == [("db", "reboot_loop", "3 guest reboots within 60 s (reboot_limit 2)")]


async def test_turning_probing_off_resolves_its_alert() -> None:
    """Review finding: a VirtwatchProbeFailed kept firing (and was re-posted) after the probe was
    turned off by a reload or an override."""
    r = Rig()
    r.event("web", "lifecycle", "STARTED", "BOOTED")
    r.agent.ok = False
    for _ in range(4):
        await r.tick(10)
    assert r.firing() == {("VirtwatchProbeFailed", "web")}
    POLICY["web"], old = GuestPolicy(), POLICY["web"]
    try:
        r.selection_listeners[0]("web")
        await r.tick(2)
        assert r.firing() == set()
        assert r.agent.sent.count("web") == 4  # not probed any more
    finally:
        POLICY["web"] = old


async def test_an_exec_probe_without_a_command_is_never_counted_against_the_guest() -> None:
    """Review finding: it failed as ``misconfigured`` and the policy restarted the guest over and
    over, while check-config said the guest was not probed."""
    r = Rig()
    POLICY["bare"] = GuestPolicy(probe="exec", probe_interval=1, probe_failure_threshold=2, probe_initial_delay=0,
                                 on_probe_failure="restart")
    try:
        r.event("bare", "lifecycle", "STARTED", "BOOTED")
        for _ in range(6):
            await r.tick(1)
        assert r.reports == [] and r.firing() == set()
        assert r.agent.sent == []  # nothing was sent to the agent
        assert r.metric("libvirt_domain_probe_failures_total", domain="bare") is None
    finally:
        del POLICY["bare"]
