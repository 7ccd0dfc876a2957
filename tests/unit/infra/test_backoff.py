"""infra.backoff: one capped exponential backoff, 1-based, with injected jitter."""

from __future__ import annotations

import pytest

from virtwatch.config import LibvirtSettings
from virtwatch.console.settings import ConsoleSettings
from virtwatch.infra.backoff import Backoff
from virtwatch.virt.connection import reconnect_backoff


def test_doubles_from_the_first_delay_and_caps_without_calling_rand() -> None:
    def no_rand() -> float:
        raise AssertionError("no jitter: rand must not be called")

    b = Backoff(0.5, 3.0, rand=no_rand)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.delay(0) == b.delay(-4) == 0.5  # below 1 counts as the first attempt


def test_factor_and_a_huge_attempt_stay_at_the_cap() -> None:
    b = Backoff(1.0, 100.0, factor=3.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]
    assert b.delay(10**6) == 100.0  # 3.0 ** 999999 overflows a float


@pytest.mark.parametrize("rand,expected", [(0.0, [1.6, 3.2, 6.4, 6.4]), (0.5, [2.0, 4.0, 8.0, 8.0]),
                                           (0.999, [2.3992, 4.7984, 8.0, 8.0])])
def test_jitter_scales_between_its_bounds_and_the_cap_holds(rand: float, expected: list[float]) -> None:
    b = Backoff(2.0, 8.0, jitter=(0.8, 1.2), rand=lambda: rand)
    assert [b.delay(n) for n in (1, 2, 3, 4)] == pytest.approx(expected)


@pytest.mark.parametrize("args", [(0, 1), (1, 0), (1, 2, 0.5), (1, 2, 2.0, (1.2, 0.8)), (1, 2, 2.0, (-0.1, 1.0))])
def test_invalid_values_are_refused(args: tuple) -> None:
    with pytest.raises(ValueError):
        Backoff(*args)


def test_reconnect_spreads_twenty_percent_either_way() -> None:
    s = LibvirtSettings(reconnect_min_delay=1.0, reconnect_max_delay=30.0)
    assert reconnect_backoff(s, lambda: 0.0).delay(3) == pytest.approx(3.2)
    assert reconnect_backoff(s, lambda: 0.999).delay(3) == pytest.approx(4.7984)
    assert reconnect_backoff(s, lambda: 0.999).delay(9) == 30.0


def test_console_reattach_has_no_jitter() -> None:
    s = ConsoleSettings(reattach_min_delay=0.5, reattach_max_delay=3.0)
    b = Backoff(s.reattach_min_delay, s.reattach_max_delay)
    assert [b.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
