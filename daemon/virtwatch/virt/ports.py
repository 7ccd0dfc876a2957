"""What the libvirt adapter needs from the rest of the daemon, as protocols.

``virt/`` never imports the metrics or state packages: the composition root
(:mod:`virtwatch.app`) hands in :class:`~virtwatch.metrics.instruments.Instruments`,
which satisfies :class:`VirtInstruments`, and the guest table's resync method.
"""

from __future__ import annotations

from typing import Any, Protocol


class CounterLike(Protocol):
    """A counter (``prometheus_client.Counter`` or one of its children)."""

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""


class LabelledCounter(Protocol):
    """A counter with labels."""

    def labels(self, *values: Any, **labels: Any) -> CounterLike:
        """The child counter for these label values."""


class GaugeLike(Protocol):
    """A gauge."""

    def set(self, value: float) -> None:
        """Set to ``value``."""


class HistogramLike(Protocol):
    """A histogram."""

    def observe(self, amount: float) -> None:
        """Record one observation."""


class VirtInstruments(Protocol):
    """The self-metrics the connection, the calls, the lanes and the poller update (the
    names and help texts live in :mod:`virtwatch.metrics.instruments`)."""

    @property
    def up(self) -> GaugeLike:
        """``libvirt_up``."""

    @property
    def reconnects(self) -> CounterLike:
        """``libvirt_connection_reconnects_total``."""

    @property
    def connection_attempts(self) -> LabelledCounter:
        """``libvirt_connection_attempts_total{result}``."""

    @property
    def api_errors(self) -> LabelledCounter:
        """``libvirt_api_errors_total{call,code}``."""

    @property
    def poll_duration(self) -> HistogramLike:
        """``libvirt_poll_duration_seconds``."""

    @property
    def last_poll_success(self) -> GaugeLike:
        """``libvirt_last_poll_success_timestamp_seconds``."""

    @property
    def polls_skipped(self) -> CounterLike:
        """``libvirt_polls_skipped_total``."""

    @property
    def poll_errors(self) -> CounterLike:
        """``libvirt_poll_errors_total``."""

    @property
    def lane_quarantines(self) -> LabelledCounter:
        """``virtwatch_libvirt_lane_quarantines_total{role}``."""

    @property
    def lanes_recovered(self) -> LabelledCounter:
        """``virtwatch_libvirt_lanes_recovered_total{role}``."""

    @property
    def lane_unavailable(self) -> LabelledCounter:
        """``virtwatch_libvirt_lane_unavailable_total{role,reason}``."""
