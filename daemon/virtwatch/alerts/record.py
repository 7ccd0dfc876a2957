"""One state of one alert, as the client queues, spools and delivers it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class AlertRecord:
    """One state of one alert, as queued for delivery.

    Attributes:
        labels: the full label set (``alertname``, ``severity``, ``instance``...).
        annotations: summary, description and any others.
        starts_at: epoch seconds the condition started.
        ends_at: epoch seconds it cleared; ``None`` while firing.
        late_at: epoch seconds an Alertmanager first accepted it as a *late* resolve (one no
            Alertmanager had seen firing); every member then gets the same ``endsAt`` and labels.
        key: ``(alertname, domain)`` identity used for coalescing.
    """

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float | None = None
    late_at: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """``(alertname, domain)``."""
        return (self.labels.get("alertname", ""), self.labels.get("domain", ""))

    @property
    def firing(self) -> bool:
        """True unless resolved."""
        return self.ends_at is None
