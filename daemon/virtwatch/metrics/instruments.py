"""The daemon's own instrumentation: ordinary prometheus-client objects.

Everything lives in the registry passed in (never the global default
registry), so tests and several daemons in one process stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from .. import __version__

POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Instruments:
    """Self-metrics shared by the connection, event pump and stats poller.

    Attributes (all prometheus-client objects registered in ``registry``):
        up: ``libvirt_up`` gauge, 1 while connected and resynced.
        reconnects: ``libvirt_connection_reconnects_total`` counter.
        connection_attempts: ``libvirt_connection_attempts_total{result}``.
        api_errors: ``libvirt_api_errors_total{call,code}``; ``code`` is the
            libvirt error code name (``VIR_ERR_NO_DOMAIN``) or ``timeout``.
        events: ``libvirt_events_total{kind,event,detail}``.
        poll_duration: ``libvirt_poll_duration_seconds`` histogram.
        last_poll_success: ``libvirt_last_poll_success_timestamp_seconds``.
        polls_skipped: ``libvirt_polls_skipped_total`` (previous poll still running).
        poll_errors: ``libvirt_poll_errors_total``.
        events_missed: ``virtwatch_events_missed_total{event,detail}``, lifecycle changes a
            resync found that no event reported.
        event_backlog: ``virtwatch_event_backlog`` events queued, not yet delivered.
        lane_quarantines: ``virtwatch_libvirt_lane_quarantines_total{role}``, lanes
            taken out of service because a call outlived its deadline.
        lanes_recovered: ``virtwatch_libvirt_lanes_recovered_total{role}``, quarantined
            lanes closed after their stuck call returned.
        lane_unavailable: ``virtwatch_libvirt_lane_unavailable_total{role,reason}``, calls
            not made because the role had no usable lane (``cap``, ``busy``, ``open_failed``...).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.up = Gauge("libvirt_up", "1 if virtwatch is connected to libvirtd and has resynced guest state.",
                        registry=registry)
        self.reconnects = Counter("libvirt_connection_reconnects", "Connections re-established after a loss.",
                                  registry=registry)
        self.connection_attempts = Counter("libvirt_connection_attempts",
                                           "Attempts to open the libvirt connection, by result.", ["result"],
                                           registry=registry)
        self.api_errors = Counter("libvirt_api_errors", "Failed libvirt API calls by call and libvirt error code.",
                                  ["call", "code"], registry=registry)
        self.events = Counter("libvirt_events", "libvirt events received, by kind, decoded event and detail.",
                              ["kind", "event", "detail"], registry=registry)
        self.poll_duration = Histogram("libvirt_poll_duration_seconds",
                                       "Duration of one statistics poll (getAllDomainStats and host figures).",
                                       buckets=POLL_BUCKETS, registry=registry)
        self.last_poll_success = Gauge("libvirt_last_poll_success_timestamp_seconds",
                                       "Unix time of the last statistics poll that completed.", registry=registry)
        self.polls_skipped = Counter("libvirt_polls_skipped",
                                     "Polls not started because the previous poll was still running.",
                                     registry=registry)
        self.poll_errors = Counter("libvirt_poll_errors", "Statistics polls that failed or timed out.",
                                   registry=registry)
        self.events_missed = Counter("virtwatch_events_missed",
                                     "Lifecycle changes a resync found that no event reported (libvirt was "
                                     "unreachable, or a reload was under way), by the event they stand for.",
                                     ["event", "detail"], registry=registry)
        self.event_backlog = Gauge("virtwatch_event_backlog", "Events queued and not yet delivered.",
                                   registry=registry)
        self.lane_quarantines = Counter("virtwatch_libvirt_lane_quarantines",
                                        "Lanes quarantined because a call outlived its deadline, by role.",
                                        ["role"], registry=registry)
        self.lanes_recovered = Counter("virtwatch_libvirt_lanes_recovered",
                                       "Quarantined lanes closed after their stuck call returned, by role.",
                                       ["role"], registry=registry)
        self.lane_unavailable = Counter("virtwatch_libvirt_lane_unavailable",
                                        "Calls not made because the role had no usable lane, by role and reason.",
                                        ["role", "reason"], registry=registry)
        build = GaugeMetricFamily("virtwatch_build_info", "virtwatch version.", labels=["version"])
        build.add_metric([__version__], 1)
        self._build = build
        registry.register(self)

    def collect(self) -> Iterator[Metric]:  # prometheus-client collector protocol
        """Yield the constant ``virtwatch_build_info`` family."""
        yield self._build

    def describe(self) -> list[Metric]:
        """Describe without collecting (prometheus-client protocol)."""
        return [self._build]
