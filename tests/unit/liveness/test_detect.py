"""The pure liveness detectors: probe streaks, console lines, reboot windows, busy but silent."""

from virtwatch.liveness.detect import (
    PEGGED_CPU_RATIO,
    ActivitySample,
    ConsoleMatcher,
    HangTracker,
    ProbeStreak,
    RebootWindow,
    activity_sample,
    compile_patterns,
)
from virtwatch.policy.config import DEFAULT_CONSOLE_FAILURE_PATTERNS

DEFAULT = compile_patterns(DEFAULT_CONSOLE_FAILURE_PATTERNS)


def test_streak_reports_once_at_the_threshold_and_a_pass_clears_it() -> None:
    s = ProbeStreak()
    assert [s.record(False, 3) for _ in range(5)] == [False, False, True, False, False]
    assert s.failures == 5 and s.reported
    assert s.record(True, 3) is False and s.failures == 0 and not s.reported
    assert [s.record(False, 1) for _ in range(2)] == [True, False]


def test_default_patterns_match_linux_failure_lines_only() -> None:
    lines = {
        "[   12.345678] Kernel panic - not syncing: sysrq triggered crash": True,
        "[    3.1] BUG: kernel NULL pointer dereference, address: 0000000000000000": True,
        "[    3.2] Oops: 0002 [#1] PREEMPT SMP NOPTI": True,
        "[   60.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]": True,
        "VW READY name=x": False,
        "DEBUG: all fine": False,
        "no Oops here": False,
    }
    for line, bad in lines.items():
        m = ConsoleMatcher()
        assert (m.feed(line.encode() + b"\r\n", DEFAULT) is not None) is bad, line


def test_lines_split_across_reads_match_once_and_partial_lines_are_searched() -> None:
    m = ConsoleMatcher()
    assert m.feed(b"boot ok\nKernel pa", DEFAULT) is None
    assert m.feed(b"nic - not syncing: Fatal exception", DEFAULT) == "Kernel panic - not syncing: Fatal exception"
    assert m.feed(b"\nKernel panic - not syncing: again\n", DEFAULT) is None  # once per run
    m.reset()
    assert m.feed(b"x\r\nOops: 0000 [#2]\r\n", DEFAULT) == "Oops: 0000 [#2]"
    assert ConsoleMatcher().feed(b"Kernel panic - not syncing\n", ()) is None  # no patterns: never


def test_partial_line_is_bounded() -> None:
    m = ConsoleMatcher()
    for _ in range(100):
        assert m.feed(b"x" * 1000, DEFAULT) is None
    assert m.feed(b"Kernel panic - not syncing\n", DEFAULT) is not None


def test_reboot_window_counts_within_the_interval_and_calms_down() -> None:
    w = RebootWindow()
    assert [w.record(t, 2, 60) for t in (0, 10, 20)] == [False, False, True]
    assert w.record(25, 2, 60) is False  # reported once
    assert w.calm(50, 2, 60) is False
    assert w.calm(71, 2, 60) is True and w.count(71, 60) == 2  # t=0 and t=10 left the window
    assert [w.record(t, 2, 60) for t in (200, 300, 400)] == [False, False, False]  # spread out: no loop
    w.reset()
    assert w.count(400, 60) == 0


def sample(cpu_s: float, io: int, at: float, vcpus: int = 1) -> ActivitySample:
    return ActivitySample(int(cpu_s * 1e9), vcpus, io, at)


def test_hang_needs_pegged_cpu_and_silent_io_for_hang_after() -> None:
    h = HangTracker()
    assert h.update(sample(0, 100, 0), 5) is None
    assert h.update(sample(0.8, 100, 1), 5) is None and h.busy_since == 0
    assert h.update(sample(4.0, 100, 5), 5) == "hung"
    assert h.cpu_ratio == 0.8
    assert h.update(sample(4.8, 100, 6), 5) is None  # reported once
    assert h.update(sample(5.6, 101, 7), 5) == "recovered"  # one byte of I/O
    assert not h.hung and h.busy_since is None


def test_idle_and_busy_with_io_are_not_hung() -> None:
    idle, busy = HangTracker(), HangTracker()
    for t in range(20):
        assert idle.update(sample(0.05 * t, 0, t), 3) is None
        assert busy.update(sample(0.9 * t, 4096 * t, t), 3) is None
    assert idle.cpu_ratio is not None and idle.cpu_ratio < PEGGED_CPU_RATIO
    # two vCPUs, one of them spinning: half the guest's capacity is not "pegged"
    two = HangTracker()
    two.update(sample(0, 0, 0, vcpus=2), 1)
    assert two.update(sample(0.9, 0, 1, vcpus=2), 1) is None and two.cpu_ratio == 0.45


def test_a_counter_going_back_is_a_restart_not_a_sample() -> None:
    h = HangTracker()
    h.update(sample(100, 10, 0), 1)
    assert h.update(sample(0.5, 0, 1), 1) is None and h.cpu_ratio is None


def test_activity_sample_reads_bulk_fields() -> None:
    stats = {"cpu.time": 5_000_000_000, "vcpu.current": 2, "block.count": 1, "block.0.rd.bytes": 100,
             "block.0.wr.bytes": 20, "block.0.rd.reqs": 9, "net.count": 1, "net.0.rx.bytes": 3,
             "net.0.tx.bytes": 4, "net.0.rx.pkts": 7}
    assert activity_sample(stats, 12.0) == ActivitySample(5_000_000_000, 2, 127, 12.0)
    assert activity_sample({"state.state": 1}, 1.0) is None


def test_reboot_bursts_coalesce_from_the_last_counted_reboot() -> None:
    w = RebootWindow()
    assert [w.new_reboot(t) for t in (0.0, 0.05, 1.9, 2.0, 3.0, 4.1)] == [True, False, False, True, False, True]
    w.reset()
    assert w.new_reboot(4.2)
