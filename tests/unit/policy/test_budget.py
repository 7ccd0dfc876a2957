"""Restart budget arithmetic: backoff, jitter, given up, stable reset."""

import pytest

from virtwatch.policy import budget
from virtwatch.policy.budget import History
from virtwatch.policy.config import GuestPolicy

P = GuestPolicy(restart_delay=10, restart_backoff=2, restart_max_delay=60, restart_jitter=0.5,
                limit_burst=3, limit_interval=100, stable_after=30)


@pytest.mark.parametrize("attempt, rand, expected", [
    (1, 0.0, 10.0), (2, 0.0, 20.0), (3, 0.0, 40.0), (4, 0.0, 60.0), (10, 0.0, 60.0),
    (1, 0.5, 12.5), (1, 0.999, 10 + 10 * 0.5 * 0.999), (4, 1.0, 90.0), (0, 0.0, 10.0),
])
def test_backoff_delay(attempt, rand, expected):
    assert budget.backoff_delay(attempt, P, rand) == pytest.approx(expected)


def test_failures_until_given_up():
    h = History()
    for i, t in enumerate([0.0, 5.0, 10.0], start=1):
        h = budget.record_failure(h, t, P, "crash")
        assert not h.given_up
        assert h.attempt == i
        assert budget.remaining(h, t, P) == 3 - i
    h = budget.record_failure(h, 15.0, P, "crash")
    assert h.given_up
    assert h.given_up_reason == "4 failures within 100 s (limit_burst 3), last: crash"
    assert h.next_retry is None


def test_failures_outside_window_are_forgotten():
    h = History()
    for t in (0.0, 50.0, 99.0):
        h = budget.record_failure(h, t, P, "crash")
    h = budget.record_failure(h, 120.0, P, "crash")  # 0.0 left the 100 s window
    assert not h.given_up
    assert h.failures == (50.0, 99.0, 120.0)


def test_crash_soon_after_start_grows_attempt_stable_run_resets():
    h = budget.record_failure(History(), 0.0, P, "crash")
    h = budget.record_start(h, 10.0, P)
    h = budget.record_failure(h, 20.0, P, "crash")   # 10 s after start < stable_after 30
    assert h.attempt == 2
    h = budget.record_start(h, 40.0, P)
    assert budget.record_stable(h, 69.0, P).attempt == 2
    assert budget.record_stable(h, 70.0, P).attempt == 0
    h = budget.record_failure(h, 75.0, P, "crash")   # ran 35 s: backoff starts over
    assert h.attempt == 1


def test_failed_start_without_running_keeps_growing():
    h = budget.record_failure(History(), 0.0, P, "crash")
    h = budget.record_failure(h, 50.0, P, "start failed")   # no start in between
    assert h.attempt == 2


def test_reset_clears_budget_keeps_counts():
    h = budget.record_restart(History(), "crash")
    for t in (0.0, 1.0, 2.0, 3.0):
        h = budget.record_failure(h, t, P, "crash")
    assert h.given_up
    r = budget.reset(h)
    assert (r.given_up, r.failures, r.attempt, r.given_up_reason) == (False, (), 0, "")
    assert dict(r.restarts) == {"crash": 1}


def test_restart_counts_by_reason_are_immutable_copies():
    h1 = budget.record_restart(History(), "crash")
    h2 = budget.record_restart(h1, "crash")
    h3 = budget.record_restart(h2, "qemu_failure")
    assert dict(h1.restarts) == {"crash": 1}
    assert dict(h3.restarts) == {"crash": 2, "qemu_failure": 1}


def test_io_resume_backoff_and_reset():
    p = GuestPolicy(io_error_resume_delay=5, restart_backoff=3, restart_max_delay=100, stable_after=30)
    assert [budget.io_resume_delay(n, p) for n in range(5)] == [5, 15, 45, 100, 100]
    h = budget.record_resume(History(), 10.0)
    h = budget.record_resume(h, 20.0)
    assert h.io_resumes == 2
    assert budget.record_stable(h, 49.0, p).io_resumes == 2
    assert budget.record_stable(h, 50.0, p).io_resumes == 0
