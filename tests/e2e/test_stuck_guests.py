"""A hung guest never blinds virtwatch to the others (issue 9), on real QEMU guests.

Ten running TCG guests and a real ``virtwatch run`` polling every 5 s. A guest's QEMU
stopped with SIGSTOP behaves like one hung on dead NFS storage: the statistics call
that reaches it blocks in libvirtd until SIGCONT. virtwatch must quarantine that
call's lane, keep reading every other guest on fresh lanes, mark the hung guest
stale, keep its host figures fresh, bound its threads and libvirtd clients, and
return to its normal lane count once the guest answers.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostlib import Guest, GuestFactory, libvirtd_pid, start_libvirtd, thaw
from hostlib.daemon import VirtwatchProcess, sample
from hostlib.stuck import (
    PollRecorder,
    advanced_share,
    frozen,
    lanes_total,
    libvirtd_clients,
    poll_durations,
    thread_count,
)

GUESTS = 10
POLL = 5.0
DEADLINE = 4.0  # the default poll deadline: 80 % of the interval
FREEZE = 90.0
CAP = 4  # stats.max_stuck_lanes, the default


@pytest.fixture(scope="module")
def fleet(module_guest_factory: GuestFactory) -> list[Guest]:
    """Ten running guests (disk and NIC, so every stats group reaches QEMU's monitor)."""
    start_libvirtd()  # idempotent: an earlier test may have restarted it
    return module_guest_factory.create_many(GUESTS, "stuck", options={"net": 1}, boot_timeout=120)


def daemon(workdir: Path, poll: float, extra: str = "") -> VirtwatchProcess:
    # every group and the host figures read at every poll (stats.group_intervals = {}): the most
    # calls a frozen guest can block, and host figures that must be fresh at each poll
    return VirtwatchProcess(workdir, config=(
        "[stats]\ngroup_intervals = {}\n[agent]\nenabled = false\n[log]\nevents = false\n"
        f"[daemon]\nstate_dir = \"{workdir}\"\nsocket = \"{workdir / 'vw.sock'}\"\n{extra}"),
        poll_interval=poll)


@pytest.fixture(scope="module")
def watcher(fleet: list[Guest], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtwatchProcess]:
    """virtwatch polling every 5 s, with every guest read at least once."""
    vw = daemon(tmp_path_factory.mktemp("stuck"), POLL)
    vw.start()
    names = [g.name for g in fleet]
    vw.wait_until(lambda: all(sample(vw.scrape(), "libvirt_domain_stats_stale", domain=n) == 0 for n in names),
                  3 * POLL, "not every guest polled")
    try:
        yield vw
    finally:
        code = vw.stop()
        assert code == 0, vw.log_tail()
        assert "Fatal Python error" not in vw.log_text()


def check_window(rec: PollRecorder, vw: VirtwatchProcess, victims: list[str], healthy: list[str],
                 start: float, end: float) -> list[str]:
    """Assert what must hold while ``victims`` are frozen; return printable figures."""
    window = rec.between(start, end)
    assert len(window) >= int(FREEZE / POLL) - 2, f"only {len(window)} polls seen in {FREEZE} s"
    prev = rec.before(start)
    paired = ([prev] if prev else []) + window  # the first poll after SIGSTOP is the one that meets the hang
    shares = {n: advanced_share(paired, n) for n in healthy}
    assert min(shares.values()) >= 0.8, f"CPU time of healthy guests advanced in too few polls: {shares}"
    for r in window:
        # host figures were read in this very poll (or the one before, if the scrape raced it)
        assert r.host_ts is not None and r.wall - r.host_ts <= POLL + 1.0, (r.poll, r.wall, r.host_ts)
        # bounded: one thread per lane plus the main thread and one worker; a client per lane (+2 slack)
        assert r.threads is not None and r.threads <= lanes_total(r) + 2, (r.poll, r.threads, r.lanes)
        assert r.clients is not None and r.clients <= lanes_total(r) + 2, (r.poll, r.clients, r.lanes)
        assert r.lanes.get("quarantined", 0) <= CAP
    stale_at = rec.first(lambda r: all(r.stale.get(v) == 1 for v in victims), start)
    assert stale_at is not None, "the frozen guests never went stale"
    to_stale = stale_at.at - start
    assert to_stale <= POLL + DEADLINE + 1.0, f"stale only after {to_stale:.1f} s"
    later = [r for r in window if r.at >= stale_at.at]
    assert all(r.stale.get(v) == 1 for r in later for v in victims)
    assert all(r.stale.get(n) == 0 for r in later[1:] for n in healthy)
    periods = [b.at - a.at for a, b in itertools.pairwise(window)]
    durations = poll_durations(paired)
    return [f"SIGSTOP to stale {to_stale:.1f} s",
            f"healthy guests' CPU advanced in {100 * min(shares.values()):.0f}-{100 * max(shares.values()):.0f} % "
            f"of {len(paired) - 1} polls",
            f"poll period median {sorted(periods)[len(periods) // 2]:.2f} s, poll duration median "
            f"{sorted(durations)[len(durations) // 2]:.2f} s, max {max(durations):.2f} s",
            f"max threads {max(r.threads or 0 for r in window)}, max libvirtd clients "
            f"{max(r.clients or 0 for r in window)}, max lanes {max(lanes_total(r) for r in window):.0f}, "
            f"max quarantined {rec.max_quarantined:.0f}"]


def check_recovered(rec: PollRecorder, vw: VirtwatchProcess, victims: list[str], thawed: float,
                    normal_active: float) -> float:
    """Within two polls of SIGCONT: no lane quarantined, the normal lane count, victims fresh."""
    vw.wait_until(lambda: any(r.at >= thawed and r.lanes.get("quarantined") == 0
                              and r.lanes.get("active") == normal_active
                              and all(r.stale.get(v) == 0 for v in victims) for r in rec.records),
                  2 * POLL + 2.0, "not back to normal within two polls of SIGCONT")
    back = next(r for r in rec.records if r.at >= thawed and r.lanes.get("quarantined") == 0
                and all(r.stale.get(v) == 0 for v in victims))
    return back.at - thawed


def run_freeze(vw: VirtwatchProcess, fleet: list[Guest], victims: list[str]) -> None:
    normal = sample(vw.scrape(), "virtwatch_libvirt_lanes", state="active")
    healthy = [g.name for g in fleet if g.name not in victims]
    with PollRecorder(vw) as rec:
        time.sleep(POLL)
        with frozen(victims) as start:
            time.sleep(FREEZE)
            end = time.monotonic()
        thawed = time.monotonic()
        figures = check_window(rec, vw, victims, healthy, start, end)
        back = check_recovered(rec, vw, victims, thawed, normal)
    print(f"\n{len(victims)} of {len(fleet)} guests frozen {FREEZE:.0f} s, polls every {POLL:.0f} s: "
          + "; ".join(figures) + f"; SIGCONT to normal {back:.1f} s")
    assert vw.proc is not None and vw.proc.poll() is None


def test_one_frozen_guest_costs_only_itself(watcher: VirtwatchProcess, fleet: list[Guest]) -> None:
    run_freeze(watcher, fleet, [fleet[0].name])


def test_three_frozen_guests_and_the_cap(watcher: VirtwatchProcess, fleet: list[Guest]) -> None:
    run_freeze(watcher, fleet, [g.name for g in fleet[1:4]])


def test_freeze_thaw_cycles_then_libvirtd_freeze(watcher: VirtwatchProcess, fleet: list[Guest],
                                                tmp_path: Path) -> None:
    """Ten freeze/thaw cycles of one guest back to back, then libvirtd itself frozen (the
    scenario that crashed the daemon before lanes): the daemon survives every one and
    leaves no lane behind.

    The 5 s ``watcher`` keeps running, as a second monitor on the same host does: when
    its call is the one stuck on the frozen guest, this daemon's NOWAIT calls skip the
    guest and get a thin answer, which must still read stale, never fresh."""
    poll = 2.0
    vw = daemon(tmp_path, poll, "[libvirt]\nkeepalive_interval = 1\nkeepalive_count = 2\n"
                "reconnect_min_delay = 0.5\nreconnect_max_delay = 2.0\ncall_timeout = 5.0\n")
    vw.start()
    victim = fleet[4].name
    names = [g.name for g in fleet]
    try:
        vw.wait_until(lambda: all(sample(vw.scrape(), "libvirt_domain_stats_stale", domain=n) == 0 for n in names),
                      3 * poll, "not every guest polled")
        normal = sample(vw.scrape(), "virtwatch_libvirt_lanes", state="active")
        cycles = []
        for _ in range(10):
            with frozen([victim]) as t0:
                vw.wait_until(lambda: sample(vw.scrape(), "libvirt_domain_stats_stale", domain=victim) == 1,
                              2 * poll + 0.8 * poll, "frozen guest not stale", interval=0.1)
                stale = time.monotonic() - t0
            t1 = time.monotonic()
            vw.wait_until(lambda: (lambda t: sample(t, "libvirt_domain_stats_stale", domain=victim) == 0
                                   and sample(t, "virtwatch_libvirt_lanes", state="quarantined") == 0)(vw.scrape()),
                          3 * poll, "not back after thaw", interval=0.1)
            cycles.append(f"{stale:.1f}/{time.monotonic() - t1:.1f}")
        text = vw.scrape()
        recovered = sample(text, "virtwatch_libvirt_lanes_recovered_total", role="stats") or 0
        # libvirtd frozen: keepalive notices, every lane goes, and all of it comes back after SIGCONT
        pid = libvirtd_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            vw.wait_until(lambda: sample(vw.scrape(), "libvirt_up") == 0, 10, "libvirtd freeze not noticed")
        finally:
            survived = thaw(pid)
        vw.wait_until(lambda: sample(vw.scrape(), "libvirt_up") == 1, 30, "never reconnected")
        mark = time.time()
        vw.wait_until(lambda: (lambda t: (sample(t, "libvirt_last_poll_success_timestamp_seconds") or 0) > mark
                               and all(sample(t, "libvirt_domain_stats_stale", domain=n) == 0 for n in names)
                               and sample(t, "virtwatch_libvirt_lanes", state="quarantined") == 0
                               and sample(t, "virtwatch_libvirt_lanes", state="active") == normal)(vw.scrape()),
                      30, "polls did not resume with the normal lanes")
        assert vw.proc is not None
        text = vw.scrape()
        lanes = (sample(text, "virtwatch_libvirt_lanes", state="active") or 0) + (
            sample(text, "virtwatch_libvirt_lanes", state="quarantined") or 0)
        threads, clients = thread_count(vw.proc.pid), libvirtd_clients(vw.proc.pid)
        print(f"\n10 freeze/thaw cycles at {poll:g} s polls (a 5 s monitor beside), "
              f"stale/fresh again (s): {', '.join(cycles)}; "
              f"lanes recovered {recovered:.0f}; libvirtd frozen and thawed (it survived: {survived}); "
              f"after: {lanes:.0f} lanes, {threads} threads, {clients} libvirtd clients")
        assert threads <= lanes + 2 and clients <= lanes + 2
    finally:
        code = vw.stop()
    assert code == 0, vw.log_tail()
    assert "Fatal Python error" not in vw.log_text()
