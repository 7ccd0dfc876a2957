"""Pure liveness detectors: no I/O, no clock of their own (times come in as arguments).

Each keeps the state of one guest and answers "is this a failure now?":

* :class:`ProbeStreak`: consecutive failed probes against ``probe_failure_threshold``;
* :class:`ConsoleMatcher`: console bytes cut into lines, searched for ``console_failure_patterns``;
* :class:`RebootWindow`: guest reboots within ``reboot_interval`` against ``reboot_limit``;
* :class:`HangTracker`: vCPU time pegged while block and network I/O stand still, for ``hang_after``.

Each reports a failure once (``reported``) until the guest recovers or starts over (``reset``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: A guest whose vCPUs run at least this fraction of the wall time (``cpu.time`` per vCPU) is
#: "pegged" for the hang detector. Measured on 1-vCPU TCG guests here (README, "Liveness"): an
#: idle guest at 0.005, a Linux kernel panicked with panic=0 spinning at 1.00.
PEGGED_CPU_RATIO = 0.5

#: REBOOT events of one guest less than this many seconds after the last one counted are the
#: same reboot: one guest reboot sent 5 REBOOT events within 60 ms here (8 within 1.8 s on a
#: loaded host). Counted from the last *counted* reboot, so a guest that really reboots faster
#: than this is still counted (every other reboot at worst).
REBOOT_COALESCE = 2.0

#: Longest partial console line kept while waiting for its newline, bytes.
MAX_PARTIAL_LINE = 4096


@dataclasses.dataclass(slots=True)
class ProbeStreak:
    """Consecutive probe failures of one guest.

    ``failures``: the current streak; ``reported``: the streak already made a failure
    (reported once, on the probe that reached the threshold).
    """

    failures: int = 0
    reported: bool = False

    def record(self, ok: bool, threshold: int) -> bool:
        """Count one probe result; True exactly when this result makes the streak a failure."""
        if ok:
            self.failures, self.reported = 0, False
            return False
        self.failures += 1
        if self.failures >= threshold and not self.reported:
            self.reported = True
            return True
        return False

    def reset(self) -> None:
        """The guest started over (start, reboot): no streak."""
        self.failures, self.reported = 0, False


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile ``console_failure_patterns`` (validated by the policy's config). Raises re.error."""
    return tuple(re.compile(p) for p in patterns)


class ConsoleMatcher:
    """Console bytes of one guest, cut into lines and searched for failure patterns.

    A partial line is kept (at most :data:`MAX_PARTIAL_LINE` bytes) until its newline comes,
    but searched at once too: a panicking kernel may never print the newline.
    """

    def __init__(self) -> None:
        self._partial = b""
        self.reported = False
        self.matched: str | None = None

    def feed(self, data: bytes, patterns: tuple[re.Pattern[str], ...]) -> str | None:
        """Add console bytes; returns the first line matching one of ``patterns`` (decoded,
        stripped), once: None after a match until :meth:`reset`."""
        if self.reported or not patterns:
            self._partial = (self._partial + data)[-MAX_PARTIAL_LINE:]
            return None
        text = self._partial + data
        *lines, self._partial = text.replace(b"\r", b"\n").split(b"\n")
        self._partial = self._partial[-MAX_PARTIAL_LINE:]
        for raw in [*lines, self._partial]:
            line = raw.decode("utf-8", errors="replace").strip()
            if line and any(p.search(line) for p in patterns):
                self.reported, self.matched = True, line
                self._partial = b""
                return line
        return None

    def reset(self) -> None:
        """The guest started over: match again."""
        self._partial, self.reported, self.matched = b"", False, None


@dataclasses.dataclass(slots=True)
class RebootWindow:
    """Guest-initiated reboots of one guest (monotonic seconds), and whether they made a loop."""

    times: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    reported: bool = False
    last: float | None = None

    def new_reboot(self, now: float) -> bool:
        """Whether a REBOOT event at ``now`` is a new reboot (not within :data:`REBOOT_COALESCE`
        seconds of the last one counted); remembers it when it is."""
        if self.last is not None and now - self.last < REBOOT_COALESCE:
            return False
        self.last = now
        return True

    def count(self, now: float, interval: float) -> int:
        """Reboots within ``interval`` seconds before ``now`` (older ones are forgotten)."""
        while self.times and now - self.times[0] >= interval:
            self.times.popleft()
        return len(self.times)

    def record(self, now: float, limit: int, interval: float) -> bool:
        """Count a reboot at ``now``; True exactly when it makes more than ``limit`` within ``interval``."""
        self.times.append(now)
        if self.count(now, interval) > limit and not self.reported:
            self.reported = True
            return True
        return False

    def calm(self, now: float, limit: int, interval: float) -> bool:
        """True once a reported loop has calmed down (``limit`` or fewer reboots in the window);
        it may be reported again after that."""
        if self.reported and self.count(now, interval) <= limit:
            self.reported = False
            return True
        return False

    def reset(self) -> None:
        """The guest was stopped and started: its reboot history starts over."""
        self.times.clear()
        self.reported = False
        self.last = None


@dataclasses.dataclass(frozen=True, slots=True)
class ActivitySample:
    """What the hang detector reads from one poll of one guest (``getAllDomainStats``).

    ``cpu_ns``: ``cpu.time``; ``vcpus``: ``vcpu.current`` (1 if absent); ``io``: the sum of
    ``block.N.rd.bytes``, ``block.N.wr.bytes``, ``net.N.rx.bytes`` and ``net.N.tx.bytes``;
    ``at``: the poll's wall time, seconds.
    """

    cpu_ns: int
    vcpus: int
    io: int
    at: float


def activity_sample(stats: Mapping[str, Any], at: float) -> ActivitySample | None:
    """An :class:`ActivitySample` from one guest's bulk stats dict, None without ``cpu.time``."""
    cpu = stats.get("cpu.time")
    if cpu is None:
        return None
    io = 0
    for key, value in stats.items():
        if (key.startswith("block.") and key.endswith((".rd.bytes", ".wr.bytes"))) or (
                key.startswith("net.") and key.endswith((".rx.bytes", ".tx.bytes"))):
            io += int(value)
    return ActivitySample(int(cpu), max(1, int(stats.get("vcpu.current") or 1)), io, at)


@dataclasses.dataclass(slots=True)
class HangTracker:
    """Busy but silent: vCPU time pegged (:data:`PEGGED_CPU_RATIO`) while block and network
    I/O stand still, for ``hang_after`` seconds.

    Attributes:
        last: the previous sample; ``busy_since``: wall time the current busy-and-silent
        stretch began (None: not in one); ``cpu_ratio``: the last interval's vCPU time per vCPU
        per wall second; ``hung``: the stretch reached ``hang_after`` (reported once).
    """

    last: ActivitySample | None = None
    busy_since: float | None = None
    cpu_ratio: float | None = None
    hung: bool = False

    def update(self, sample: ActivitySample, hang_after: float) -> str | None:
        """Add a sample; returns ``"hung"`` when the guest just became hung, ``"recovered"``
        when a hung guest shows I/O or idles again, else None."""
        prev, self.last = self.last, sample
        if prev is None or sample.at <= prev.at or sample.cpu_ns < prev.cpu_ns or sample.io < prev.io:
            return None  # first sample, or counters reset (the guest restarted)
        self.cpu_ratio = (sample.cpu_ns - prev.cpu_ns) / 1e9 / (sample.at - prev.at) / sample.vcpus
        if self.cpu_ratio >= PEGGED_CPU_RATIO and sample.io == prev.io:
            if self.busy_since is None:
                self.busy_since = prev.at
            if not self.hung and sample.at - self.busy_since >= hang_after:
                self.hung = True
                return "hung"
            return None
        self.busy_since = None
        if self.hung:
            self.hung = False
            return "recovered"
        return None

    def reset(self) -> None:
        """The guest started over."""
        self.last, self.busy_since, self.cpu_ratio, self.hung = None, None, None, False
