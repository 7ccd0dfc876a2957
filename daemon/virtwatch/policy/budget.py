"""Restart budget and backoff, in systemd's vocabulary. Pure functions over an immutable :class:`History`.

- A *failure* is a crash/QEMU failure/host kill/watchdog/kill of a guest whose
  intent is running, or a start attempt that libvirt refused.
- The delay before attempt *n* (1-based, consecutive failures since the guest
  last ran ``stable_after`` seconds) is ``restart_delay * restart_backoff**(n-1)``
  capped at ``restart_max_delay``, plus jitter ``r * restart_jitter * delay``
  with ``r`` from an injected random source in [0, 1).
- More than ``limit_burst`` failures within ``limit_interval`` -> *given up*;
  only :func:`reset` (operator ``virtwatch reset``) clears it.
- A crash sooner than ``stable_after`` after a start counts against the backoff
  (the attempt number grows); running ``stable_after`` resets it to 0.

All timestamps are wall-clock seconds (they are persisted); durations seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from .config import GuestPolicy


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """Per-guest restart history (persisted).

    Attributes:
        failures: wall-clock times of failures still inside the limit window, oldest first.
        attempt: consecutive failures since the guest last ran stably (0 = healthy).
        last_start: wall-clock time the guest was last seen starting, or None.
        given_up: True once the budget is exhausted (cleared only by :func:`reset`).
        given_up_reason: why it was given up ("" when not).
        next_retry: wall-clock time of the scheduled retry, or None.
        restarts: restarts performed, by cause (``crash``, ``qemu_failure``...).
        io_resumes: consecutive I/O-error resumes (drives the resume backoff).
        last_failure: wall-clock time of the last failure, or None.
        last_resume: wall-clock time of our last I/O-error resume, or None.
    """

    failures: tuple[float, ...] = ()
    attempt: int = 0
    last_start: float | None = None
    given_up: bool = False
    given_up_reason: str = ""
    next_retry: float | None = None
    restarts: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    io_resumes: int = 0
    last_failure: float | None = None
    last_resume: float | None = None

    def replace(self, **changes: object) -> History:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def is_stable(history: History, now: float, policy: GuestPolicy) -> bool:
    """True when the backoff should start over: no failure streak, or the guest
    started after the last failure and has run ``stable_after`` seconds since."""
    if history.attempt == 0:
        return True
    if history.last_start is None or history.last_failure is None or history.last_start < history.last_failure:
        return False
    return now - history.last_start >= policy.stable_after


def window(history: History, now: float, policy: GuestPolicy) -> tuple[float, ...]:
    """The failure timestamps inside ``limit_interval`` before ``now``."""
    return tuple(t for t in history.failures if now - t < policy.limit_interval)


def record_failure(history: History, now: float, policy: GuestPolicy, reason: str) -> History:
    """Count one failure at ``now``; gives up when failures in the window exceed ``limit_burst``.

    The attempt number restarts at 1 when the guest had run ``stable_after``,
    else it grows (a crash soon after a start is a failed start).
    """
    failures = (*window(history, now, policy), now)
    attempt = 1 if is_stable(history, now, policy) else history.attempt + 1
    h = history.replace(failures=failures, attempt=attempt, next_retry=None, last_failure=now)
    if len(failures) > policy.limit_burst:
        h = give_up(
            h,
            f"{len(failures)} failures within {policy.limit_interval:g} s "
            f"(limit_burst {policy.limit_burst}), last: {reason}",
        )
    return h


def give_up(history: History, reason: str) -> History:
    """Mark the guest given up with ``reason`` (no retry pending)."""
    return history.replace(given_up=True, given_up_reason=reason, next_retry=None)


def backoff_delay(attempt: int, policy: GuestPolicy, rand: float = 0.0) -> float:
    """Seconds before restart attempt ``attempt`` (>= 1); ``rand`` in [0, 1) scales the jitter."""
    n = max(1, attempt)
    base = min(policy.restart_delay * policy.restart_backoff ** (n - 1), policy.restart_max_delay)
    return base + base * policy.restart_jitter * min(max(rand, 0.0), 1.0)


def io_resume_delay(resumes: int, policy: GuestPolicy) -> float:
    """Seconds before resuming an I/O-error pause after ``resumes`` consecutive resumes already done."""
    base = policy.io_error_resume_delay * policy.restart_backoff ** max(0, resumes)
    return min(base, max(policy.restart_max_delay, policy.io_error_resume_delay))


def record_start(history: History, now: float, policy: GuestPolicy) -> History:
    """The guest started at ``now`` (by anyone): remember it; the pending retry is void."""
    return history.replace(last_start=now, next_retry=None)


def record_stable(history: History, now: float, policy: GuestPolicy) -> History:
    """Reset the backoff when the guest has run ``stable_after`` since its last start
    (after its last failure), and the I/O resume backoff ``stable_after`` after the last resume."""
    h = history
    if h.attempt and h.last_start is not None and is_stable(h, now, policy):
        h = h.replace(attempt=0)
    if h.io_resumes and h.last_resume is not None and now - h.last_resume >= policy.stable_after:
        h = h.replace(io_resumes=0)
    return h


def record_resume(history: History, now: float) -> History:
    """We resumed an I/O-error pause at ``now``."""
    return history.replace(io_resumes=history.io_resumes + 1, last_resume=now, next_retry=None)


def record_restart(history: History, cause: str) -> History:
    """Count one restart performed for ``cause`` (for ``libvirt_domain_restarts_total{reason}``)."""
    counts = dict(history.restarts)
    counts[cause] = counts.get(cause, 0) + 1
    return history.replace(restarts=MappingProxyType(counts))


def schedule(history: History, at: float) -> History:
    """Set the pending retry time (wall clock)."""
    return history.replace(next_retry=at)


def reset(history: History) -> History:
    """Operator reset: forget failures, backoff and given-up; keep restart counts and last start."""
    return history.replace(failures=(), attempt=0, given_up=False, given_up_reason="", next_retry=None, io_resumes=0)


def remaining(history: History, now: float, policy: GuestPolicy) -> int:
    """Failures still allowed in the current window before giving up."""
    return max(0, policy.limit_burst - len(window(history, now, policy)))
