"""Hung guests on demand, and a per-poll record of what a running virtwatch exports.

Used by ``tests/e2e/test_stuck_guests.py`` (asserted) and ``bench/stuck_guests.py``
(printed). A QEMU process stopped with SIGSTOP behaves like one hung on dead NFS
storage: its monitor never answers, so a libvirt statistics call that reaches it
blocks until SIGCONT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .daemon import VirtwatchProcess


def qemu_pid(name: str) -> int:
    """PID of guest ``name``'s QEMU (libvirt's pidfile under /run/libvirt/qemu)."""
    with open(f"/run/libvirt/qemu/{name}.pid") as fh:
        return int(fh.read().strip())


@contextlib.contextmanager
def frozen(names: list[str]) -> Iterator[float]:
    """SIGSTOP the QEMUs of ``names``; SIGCONT them on exit, whatever happens.
    Yields the monotonic time of the stop."""
    pids = [qemu_pid(n) for n in names]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def thread_count(pid: int) -> int:
    """Threads of process ``pid`` (``/proc/PID/task``)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def libvirtd_clients(pid: int) -> int:
    """libvirtd clients (connections) opened by process ``pid``, from ``virt-admin``."""
    out = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    ids = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    count = 0
    for cid in ids:
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", cid], capture_output=True, text=True,
                              timeout=30).stdout
        if any(line.split(":", 1)[0].strip() == "unix_process_id" and line.split(":", 1)[1].strip() == str(pid)
               for line in info.splitlines()):
            count += 1
    return count


@dataclasses.dataclass
class PollRecord:
    """What one scrape after poll number ``poll`` showed.

    ``cpu``/``stale``/``age`` are keyed by guest name; times are the scraper's
    monotonic and wall clocks; ``lanes`` maps state to count.
    """

    poll: int
    at: float
    wall: float
    cpu: dict[str, float]
    stale: dict[str, float]
    age: dict[str, float]
    host_ts: float | None
    lanes: dict[str, float]
    poll_duration_sum: float
    threads: int | None = None
    clients: int | None = None


def parse(text: str, at: float, wall: float) -> PollRecord:
    """One :class:`PollRecord` from an exposition ``text``."""
    cpu: dict[str, float] = {}
    stale: dict[str, float] = {}
    age: dict[str, float] = {}
    lanes: dict[str, float] = {}
    poll, host_ts, dsum = -1, None, 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "libvirt_domain_cpu_time_seconds_total":
                cpu[s.labels["domain"]] = s.value
            elif s.name == "libvirt_domain_stats_stale":
                stale[s.labels["domain"]] = s.value
            elif s.name == "libvirt_domain_stats_age_seconds":
                age[s.labels["domain"]] = s.value
            elif s.name == "libvirt_poll_duration_seconds_count":
                poll = int(s.value)
            elif s.name == "libvirt_poll_duration_seconds_sum":
                dsum = s.value
            elif s.name == "libvirt_host_stats_timestamp_seconds":
                host_ts = s.value
            elif s.name == "virtwatch_libvirt_lanes":
                lanes[s.labels["state"]] = s.value
    return PollRecord(poll=poll, at=at, wall=wall, cpu=cpu, stale=stale, age=age, host_ts=host_ts, lanes=lanes,
                      poll_duration_sum=dsum)


class PollRecorder:
    """Scrapes ``vw`` every ``interval`` s in a thread and keeps the first scrape
    after each new poll (with the daemon's thread and libvirtd client counts
    when ``count_resources``)."""

    def __init__(self, vw: VirtwatchProcess, interval: float = 0.25, count_resources: bool = True) -> None:
        self.vw = vw
        self.interval = interval
        self.count_resources = count_resources
        self.records: list[PollRecord] = []
        self.max_quarantined = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poll-recorder", daemon=True)

    def __enter__(self) -> PollRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            status, body = self.vw.get("/metrics")
            if status == 200:
                rec = parse(body, time.monotonic(), time.time())
                self.max_quarantined = max(self.max_quarantined, rec.lanes.get("quarantined", 0.0))
                if rec.poll != last:
                    last = rec.poll
                    if self.count_resources and self.vw.proc is not None:
                        rec.threads = thread_count(self.vw.proc.pid)
                        rec.clients = libvirtd_clients(self.vw.proc.pid)
                    self.records.append(rec)
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[PollRecord]:
        """Records scraped in the monotonic window [start, end]."""
        return [r for r in self.records if start <= r.at <= end]

    def before(self, t: float) -> PollRecord | None:
        """The last record scraped before monotonic time ``t``."""
        earlier = [r for r in self.records if r.at < t]
        return earlier[-1] if earlier else None

    def first(self, cond: Any, after: float) -> PollRecord | None:
        """The first record scraped after ``after`` for which ``cond(record)`` holds."""
        return next((r for r in self.records if r.at >= after and cond(r)), None)


def advanced_share(records: list[PollRecord], name: str) -> float:
    """Share of consecutive poll pairs in ``records`` in which guest ``name``'s
    CPU time grew (0.0 when there is no pair)."""
    pairs = [(a, b) for a, b in itertools.pairwise(records) if name in a.cpu and name in b.cpu]
    total = len(records) - 1
    if total <= 0:
        return 0.0
    return sum(1 for a, b in pairs if b.cpu[name] > a.cpu[name]) / total


def poll_durations(records: list[PollRecord]) -> list[float]:
    """Mean poll duration (s) between consecutive records (from the histogram's sum and count)."""
    return [(b.poll_duration_sum - a.poll_duration_sum) / max(1, b.poll - a.poll)
            for a, b in itertools.pairwise(records)]


def lanes_total(rec: PollRecord) -> float:
    """Active plus quarantined lanes in ``rec``."""
    return rec.lanes.get("active", 0.0) + rec.lanes.get("quarantined", 0.0)
