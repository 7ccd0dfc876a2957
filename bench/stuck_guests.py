#!/usr/bin/env python3
"""What one or three hung guests cost virtwatch, on real QEMU guests (figures, not a test).

Boots N tiny TCG guests on qemu:///system, runs the real ``virtwatch run`` against them
with 5 s polls, and freezes guests' QEMUs with SIGSTOP (the way a QEMU hung on dead NFS
storage behaves). For a healthy window, one guest frozen and three frozen at once it
prints: poll period and duration (median and worst), the share of polls in which every
healthy guest's CPU time advanced, lanes, threads and libvirtd clients; and the time
from SIGSTOP to ``stats_stale 1`` and from SIGCONT to normal. Needs root, like tests/e2e.

    python bench/stuck_guests.py [--guests 10] [--window 60] [--poll 5]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))  # testkit, used by hostlib

from hostlib import GuestFactory, VirtwatchProcess, ensure_image, sample, start_libvirtd  # noqa: E402
from hostlib.stuck import PollRecord, PollRecorder, advanced_share, frozen, lanes_total, poll_durations  # noqa: E402

PREFIX = "vwbench-stuck-"


class BenchGuests(GuestFactory):
    """Guests named ``vwbench-stuck-*``: an e2e session's purge of ``vwe2e-*`` leaves them alone."""

    def new_name(self, label: str = "g") -> str:
        return f"{PREFIX}{label}-{next(self._counter)}-{self.run_id[-6:]}"


def describe(label: str, records: list[PollRecord], healthy: list[str], prev: PollRecord | None) -> str:
    periods = [b.at - a.at for a, b in itertools.pairwise(records)]
    paired = ([prev] if prev else []) + records  # the first pair has the poll that met the hang
    durations = poll_durations(paired)
    shares = [advanced_share(paired, n) for n in healthy]
    return (f"{label:<22} polls {len(paired) - 1:>3}  period {statistics.median(periods):5.2f} s "
            f"(max {max(periods):5.2f})  duration {statistics.median(durations):5.3f} s "
            f"(max {max(durations):5.3f})  healthy CPU advanced {100 * min(shares):5.1f} % of polls (worst guest)  "
            f"lanes max {max(lanes_total(r) for r in records):.0f}  threads max {max(r.threads or 0 for r in records)}"
            f"  libvirtd clients max {max(r.clients or 0 for r in records)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--window", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--poll", type=float, default=5.0, help="virtwatch poll interval, seconds")
    args = ap.parse_args()
    start_libvirtd()
    factory = BenchGuests(ensure_image(), test_name="bench-stuck")
    work = Path(tempfile.mkdtemp(prefix="vwbench-stuck-"))
    vw = VirtwatchProcess(work, config=(
        "[agent]\nenabled = false\n[log]\nevents = false\n"
        f"[daemon]\nstate_dir = \"{work}\"\nsocket = \"{work / 'vw.sock'}\"\n"), poll_interval=args.poll)
    try:
        t = time.monotonic()
        guests = factory.create_many(args.guests, "g", options={"net": 1}, boot_timeout=180)
        names = [g.name for g in guests]
        print(f"{args.guests} guests booted in {time.monotonic() - t:.1f} s; polls every {args.poll:g} s, "
              f"deadline {0.8 * args.poll:g} s")
        vw.start()
        vw.wait_until(lambda: all(sample(vw.scrape(), "libvirt_domain_stats_stale", domain=n) == 0 for n in names),
                      3 * args.poll, "not every guest polled")
        with PollRecorder(vw) as rec:
            t0 = time.monotonic()
            time.sleep(args.window)
            print(describe("healthy", rec.between(t0, time.monotonic()), names, rec.before(t0)))
            for count in (1, 3):
                victims = names[:count]
                healthy = names[count:]
                with frozen(victims) as stop:
                    time.sleep(args.window)
                    end = time.monotonic()
                thawed = time.monotonic()
                print(describe(f"{count} frozen", rec.between(stop, end), healthy, rec.before(stop)))
                stale = rec.first(lambda r, victims=victims: all(r.stale.get(v) == 1 for v in victims), stop)
                print(f"{'':<22} SIGSTOP -> stale {stale.at - stop if stale else float('nan'):.1f} s; "
                      f"max quarantined lanes {rec.max_quarantined:.0f}")
                vw.wait_until(lambda thawed=thawed, victims=victims: any(
                                  r.at >= thawed and r.lanes.get("quarantined") == 0
                                  and all(r.stale.get(v) == 0 for v in victims) for r in rec.records),
                              4 * args.poll, "never back to normal")
                back = next(r for r in rec.records if r.at >= thawed and r.lanes.get("quarantined") == 0
                            and all(r.stale.get(v) == 0 for v in victims))
                print(f"{'':<22} SIGCONT -> normal (no lane quarantined, guests fresh) {back.at - thawed:.1f} s")
                rec.max_quarantined = 0
                time.sleep(args.poll)
    finally:
        vw.stop()
        factory.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
