"""Capped exponential backoff with jitter: one convention for every retry loop."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between consecutive failed attempts.

    ``delay(n)`` is ``min_delay * factor**(n - 1)`` capped at ``max_delay``, times
    a multiplier drawn uniformly from ``jitter`` and capped at ``max_delay``
    again. Attempts are 1-based: ``delay(1)`` follows the first failure.

    Attributes:
        min_delay: the first delay, seconds (> 0).
        max_delay: the cap, seconds (> 0).
        factor: growth per attempt (>= 1).
        jitter: ``(low, high)`` bounds of the random multiplier (0 <= low <= high);
            ``(1, 1)`` is no jitter, ``(0.8, 1.2)`` spreads ±20 %, ``(0.5, 1)`` is
            "equal jitter" (half fixed, half random).
        rand: random source, a float in [0, 1) per call (injected for tests);
            not called without jitter.

    Raises ValueError for values outside those ranges.
    """

    min_delay: float
    max_delay: float
    factor: float = 2.0
    jitter: tuple[float, float] = (1.0, 1.0)
    rand: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        low, high = self.jitter
        if self.min_delay <= 0 or self.max_delay <= 0 or self.factor < 1 or not 0 <= low <= high:
            raise ValueError(f"invalid backoff {self.min_delay}, {self.max_delay}, {self.factor}, {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (values below 1 count as 1)."""
        try:
            raw = min(self.max_delay, self.min_delay * self.factor ** (max(1, attempt) - 1))
        except OverflowError:  # factor ** a very large attempt
            raw = self.max_delay
        low, high = self.jitter
        multiplier = low if low == high else low + (high - low) * self.rand()
        return min(self.max_delay, raw * multiplier)
