"""Migration families: ended migrations by direction and result, and the progress of running ones.

Rendered from the :class:`~virtwatch.virt.migration.MigrationTracker`'s state, never from libvirt.
Progress series exist only while a guest migrates, and only with what was read: the byte
figures come from ``jobStats``, which libvirt answers on the source only.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..virt.migration import MigrationPhase

P = "libvirt_domain_migration_"


def migration_families(phases: Mapping[str, MigrationPhase], counts: Mapping[tuple[str, str], int]) -> list[Metric]:
    """``libvirt_domain_migrations_total{direction, result}`` (every pair, from 0) and, per guest
    migrating, ``libvirt_domain_migration_*`` gauges labelled ``domain`` and ``direction``."""
    total = CounterMetricFamily("libvirt_domain_migrations_total",
                                "Live migrations that ended on this host, by direction (in: received, out: sent) "
                                "and result (ok, failed: aborted, refused or cancelled; the guest stayed on the "
                                "source).", labels=["direction", "result"])
    for (direction, result), n in sorted(counts.items()):
        total.add_metric([direction, result], n)
    labels = ["domain", "direction"]
    fams = {
        "started": GaugeMetricFamily(P + "start_timestamp_seconds",
                                     "When the running migration was first seen (event time).", labels=labels),
        "last_progress": GaugeMetricFamily(P + "last_progress_timestamp_seconds",
                                           "When the running migration last advanced: an event of it, a new "
                                           "pre-copy pass, or less data remaining (jobStats).", labels=labels),
        "iteration": GaugeMetricFamily(P + "iteration", "Pre-copy pass of the running migration "
                                       "(MIGRATION_ITERATION event, jobStats memory_iteration).", labels=labels),
        "data_remaining_bytes": GaugeMetricFamily(P + "data_remaining_bytes",
                                                  "Data still to send (jobStats data_remaining; source only).",
                                                  labels=labels),
        "data_total_bytes": GaugeMetricFamily(P + "data_total_bytes",
                                              "Data to send in all (jobStats data_total; source only).",
                                              labels=labels),
        "data_processed_bytes": GaugeMetricFamily(P + "data_processed_bytes",
                                                  "Data sent so far (jobStats data_processed; source only).",
                                                  labels=labels),
        "dirty_rate_bytes_per_second": GaugeMetricFamily(
            P + "dirty_rate_bytes_per_second",
            "Guest memory dirtied per second (jobStats memory_dirty_rate x memory_page_size; source only).",
            labels=labels),
        "elapsed_seconds": GaugeMetricFamily(P + "elapsed_seconds", "Time the migration job has run "
                                             "(jobStats time_elapsed; source only).", labels=labels),
    }
    for phase in sorted(phases.values(), key=lambda p: p.name):
        for attr, fam in fams.items():
            value = getattr(phase, attr)
            if value is not None:
                fam.add_metric([phase.name, phase.direction], value)
    return [total, *fams.values()]
