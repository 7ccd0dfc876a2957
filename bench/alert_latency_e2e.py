#!/usr/bin/env python3
"""Event → Alertmanager latency of virtwatch's instant alerts, with real guest crashes.

Everything is real: a ``prometheus-alertmanager`` on a loopback port, the ``virtwatch run``
command watching qemu:///system (policy on for the bench guests: restart 0.5 s after a
crash, no give-up), and tiny QEMU guests that panic 1 s after boot (``vw.panic=1``), so
each guest crash-loops: boot, panic, alert, restart, resolve, boot...

The bench polls Alertmanager's ``GET /api/v2/alerts`` every 10 ms. For each crash it
takes the time of the ``lifecycle CRASHED`` event as recorded by virtwatch
(``/api/v1/events``; the alert's ``startsAt`` is that same time) and the time of the
first poll that saw the alert; the difference is the latency (it includes up to one
poll period, ~10 ms, and one GET round trip). Prints every latency, the median and
the worst. Needs root (libvirtd, QEMU) like tests/e2e.

    python bench/alert_latency_e2e.py [--crashes 20] [--guests 4]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))  # testkit, used by hostlib

from hostlib import GuestFactory, VirtwatchProcess, ensure_image, start_libvirtd  # noqa: E402
from hostlib.promstack import AlertmanagerProcess  # noqa: E402

PREFIX = "vwbench-alert-"


class BenchGuests(GuestFactory):
    """GuestFactory whose guests are named ``vwbench-alert-*``, not ``vwe2e-*``: an e2e session
    starting on the same host purges every ``vwe2e-*`` guest, which would end the crash loop."""

    def new_name(self, label: str = "g") -> str:
        return f"{PREFIX}{super().new_name(label).removeprefix('vwe2e-')}"


def config(workdir: Path, am_url: str) -> str:
    """virtwatch TOML: policy restarts bench guests fast and never gives up; instant alerts on."""
    return f"""
[stats]
poll_interval = 5.0
[log]
events = false
[daemon]
state_dir = "{workdir / 'state'}"
socket = "{workdir / 'virtwatch.sock'}"
[policy]
enabled = true
debounce = 0.1
own_event_grace = 0.5
boot_settle_timeout = 1.0
boot_settle_quiet = 0.5
max_actions_per_minute = 1000
[policy.defaults]
restart_delay = 0.5
restart_backoff = 1.0
restart_jitter = 0.0
limit_burst = 1000
[[policy.match]]
glob = "{PREFIX}*"
[alerts]
alertmanager_urls = ["{am_url}"]
min_firing_duration = 0
"""


def epoch(s: str) -> float:
    """Alertmanager RFC 3339 (up to ns, Z) → epoch seconds."""
    head, _, frac = s.rstrip("Z").partition(".")
    t = datetime.datetime.fromisoformat(head + "+00:00").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def measure(crashes: int, guests: int, timeout: float) -> tuple[list[tuple[str, float]], int]:
    """Run the crash loop until ``crashes`` alerts were seen; return [(domain, latency s)] and boots."""
    start_libvirtd()
    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="vw-alert-bench-") as tmp:
        am = AlertmanagerProcess(Path(tmp) / "am")
        vw = VirtwatchProcess(Path(tmp) / "vw", poll_interval=5.0)
        factory = BenchGuests(image, test_name="alert-bench")
        try:
            am.start()
            vw.config_path.write_text(config(vw.workdir, am.url))
            vw.start()
            for _ in range(guests):
                factory.create("g", options={"panic": 1}, persistent=True, wait=False)
            names = {g.name for g in factory.guests}
            seen: dict[tuple[str, str], float] = {}
            deadline = time.monotonic() + timeout
            while len(seen) < crashes:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(seen)} crashes seen in {timeout} s\n{vw.log_tail()}")
                for a in am.alerts(alertname="VirtwatchGuestCrashed"):
                    key = (a["labels"].get("domain", ""), a["startsAt"])
                    if key[0] in names and key not in seen:
                        seen[key] = time.time()
                        print(f"crash {len(seen)}: {key[0]} startsAt {key[1]}", file=sys.stderr, flush=True)
                time.sleep(0.01)
            out = []
            for (domain, starts), seen_at in sorted(seen.items(), key=lambda kv: kv[1])[:crashes]:
                evs = vw.json(f"/api/v1/events?since=0&domain={domain}&limit=1000")["events"]
                t = epoch(starts)
                [ev] = [e for e in evs if e["kind"] == "lifecycle" and e["event"] == "CRASHED"
                        and abs(e["time"] - t) < 0.002]
                out.append((domain, seen_at - ev["time"]))
            boots = sum(1 for n in names for e in vw.json(f"/api/v1/events?since=0&domain={n}&limit=1000")["events"]
                        if e["kind"] == "lifecycle" and e["event"] == "STARTED")
            return out, boots
        finally:
            factory.cleanup()
            vw.stop()
            am.stop()


def main() -> None:
    """Parse arguments, run, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crashes", type=int, default=20)
    ap.add_argument("--guests", type=int, default=4, help="crash-looping guests at once")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    lat, boots = measure(args.crashes, args.guests, args.timeout)
    ms = [x * 1000 for _, x in lat]
    print(f"real guest crashes (pvpanic, CRASHED/PANICKED) on {args.guests} crash-looping guests, "
          f"{boots} policy restarts seen, {time.monotonic() - t0:.0f} s")
    print("latencies ms:", " ".join(f"{x:.1f}" for x in ms))
    print(f"crashes={len(ms)} median={statistics.median(ms):.1f} ms worst={max(ms):.1f} ms "
          f"(event time in virtwatch -> first 10 ms poll of Alertmanager that lists the alert)")


if __name__ == "__main__":
    main()
