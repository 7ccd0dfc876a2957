"""The migration tracker on the event sequences libvirt 9.0 / QEMU 7.2 really sent (recorded
with two libvirtds on one machine, tests/e2e/test_migration.py), and the metric families."""

from prometheus_client import CollectorRegistry

from testkit import sample
from virtwatch.metrics.collector import Exposition, StateCollector
from virtwatch.model import Event
from virtwatch.state import GuestRegistry
from virtwatch.virt.migration import FAILED, OK, MigrationPhase, MigrationTracker, apply_job_stats

U = "5a93b249-81b6-4be2-b125-e34e4c846227"

# jobStats of the source during the aborted migration (bandwidth 1 MiB/s), and the final
# JOB_COMPLETED figures of a successful one, as libvirt returned them.
JOB_RUNNING = {"operation": 5, "time_elapsed": 1999, "downtime": 300, "data_total": 135012352,
               "data_processed": 1816253, "data_remaining": 132227072, "memory_dirty_rate": 12,
               "memory_iteration": 1, "memory_page_size": 4096, "type": 2}
JOB_DONE = {"operation": 5, "time_elapsed": 4027, "data_total": 135012352, "data_processed": 102041436,
            "data_remaining": 0, "memory_iteration": 4, "memory_page_size": 4096}


class Feed:
    def __init__(self) -> None:
        self.t = MigrationTracker()
        self.seq = 0

    def __call__(self, kind: str, event: str, detail: str = "", at: float = 100.0, **payload) -> None:
        self.seq += 1
        self.t.on_event(Event(at, self.seq, "domain", kind, "g1", U, event, detail, payload))


def test_source_success_counts_one_move_out():
    f = Feed()
    f("migration_iteration", "MIGRATION_ITERATION", at=10.0, iteration=1)
    assert f.t.direction(U) == "out" and f.t.outgoing() == {U: "g1"}
    assert f.t.phases()[U].iteration == 1 and f.t.phases()[U].started == 10.0
    f("migration_iteration", "MIGRATION_ITERATION", at=10.1, iteration=2)
    f("lifecycle", "SUSPENDED", "MIGRATED", at=10.2)
    f("migration_iteration", "MIGRATION_ITERATION", at=10.2, iteration=3)
    assert f.t.phases()[U].iteration == 3
    f("lifecycle", "STOPPED", "MIGRATED", at=12.3)
    f("job_completed", "JOB_COMPLETED", at=12.3, params=JOB_DONE)
    assert f.t.direction(U) == "" and f.t.outgoing() == {}
    assert f.t.counts == {("in", OK): 0, ("in", FAILED): 0, ("out", OK): 1, ("out", FAILED): 0}
    assert f.t.outcomes[-1].result == OK and f.t.outcomes[-1].direction == "out"


def test_destination_success_and_failure():
    f = Feed()
    f("lifecycle", "STARTED", "MIGRATED", at=10.5)
    assert f.t.direction(U) == "in" and f.t.outgoing() == {}
    f("migration_iteration", "MIGRATION_ITERATION", at=10.6, iteration=1)  # never on a destination: ignored
    assert f.t.direction(U) == "in"
    f("lifecycle", "RESUMED", "MIGRATED", at=10.9)
    assert f.t.counts[("in", OK)] == 1 and f.t.direction(U) == ""
    # an aborted one: the incoming copy gets STOPPED/FAILED
    f("lifecycle", "STARTED", "MIGRATED", at=13.6)
    f("lifecycle", "STOPPED", "FAILED", at=17.4)
    assert f.t.counts[("in", FAILED)] == 1 and f.t.direction(U) == ""
    assert "migration in failed" in f.t.outcomes[-1].why


def test_aborted_migration_out_ends_on_the_job_reading():
    """The source of an aborted migration gets no lifecycle event: its job says it is over."""
    f = Feed()
    f("migration_iteration", "MIGRATION_ITERATION", at=13.6, iteration=1)
    f.t.on_job(U, True, JOB_RUNNING, 15.6)
    p = f.t.phases()[U]
    assert p.data_remaining_bytes == 132227072 and p.data_total_bytes == 135012352
    assert p.dirty_rate_bytes_per_second == 12 * 4096 and p.elapsed_seconds == 1.999
    assert p.last_progress == 15.6  # first figures read: progress
    f.t.on_job(U, True, dict(JOB_RUNNING), 16.6)
    assert f.t.phases()[U].last_progress == 15.6  # nothing moved
    f.t.on_job(U, True, {**JOB_RUNNING, "data_remaining": 100}, 17.6)
    assert f.t.phases()[U].last_progress == 17.6
    f.t.on_job(U, True, {"type": 0}, 18.0)
    assert f.t.direction(U) == "" and f.t.counts[("out", FAILED)] == 1 and f.t.counts[("out", OK)] == 0


def test_job_reading_of_a_stopped_guest_waits_for_its_event():
    f = Feed()
    f("lifecycle", "SUSPENDED", "MIGRATED", at=1.0)
    f.t.on_job(U, False, {"type": 0}, 2.0)  # migrated and stopped: STOPPED/MIGRATED decides
    assert f.t.direction(U) == "out"
    f("lifecycle", "STOPPED", "MIGRATED", at=2.1)
    assert f.t.counts[("out", OK)] == 1 and f.t.counts[("out", FAILED)] == 0


def test_source_resumed_after_a_failed_last_pass_is_a_failure():
    f = Feed()
    f("lifecycle", "SUSPENDED", "MIGRATED", at=1.0)
    f("lifecycle", "RESUMED", "MIGRATED", at=2.0)
    assert f.t.counts[("out", FAILED)] == 1


def test_unrelated_events_change_nothing():
    f = Feed()
    f("lifecycle", "STARTED", "BOOTED")
    f("lifecycle", "STOPPED", "CRASHED")
    f("lifecycle", "RESUMED", "MIGRATED")  # resumed, no migration known: not counted
    assert f.t.version == 0 and sum(f.t.counts.values()) == 0


def test_apply_job_stats_keeps_fields_libvirt_left_out():
    p = MigrationPhase("g1", U, "out", 1.0, 1.0, iteration=2, data_remaining_bytes=50)
    q = apply_job_stats(p, {"type": 2}, 5.0)
    assert (q.iteration, q.data_remaining_bytes, q.last_progress) == (2, 50, 1.0)


def test_metric_families_and_info_label():
    guests = GuestRegistry(lambda: 0.0)
    guests.on_event(Event(1.0, 1, "domain", "lifecycle", "g1", U, "STARTED", "MIGRATED"))
    tracker = MigrationTracker()
    tracker.on_event(Event(1.0, 1, "domain", "lifecycle", "g1", U, "STARTED", "MIGRATED"))
    exp = Exposition(CollectorRegistry(), StateCollector(guests, lambda: None, lambda: {}, tracker))
    text = exp.render().decode()
    assert sample(text, "libvirt_domain_info", domain="g1", uuid=U, migrating="in") == 1
    assert sample(text, "libvirt_domain_migration_start_timestamp_seconds", domain="g1", direction="in") == 1.0
    assert sample(text, "libvirt_domain_migrations_total", direction="in", result="ok") == 0
    tracker.on_event(Event(3.0, 2, "domain", "lifecycle", "g1", U, "RESUMED", "MIGRATED"))
    text = exp.render().decode()  # the tracker's version is in the cache key: re-rendered
    assert sample(text, "libvirt_domain_info", domain="g1", uuid=U, migrating="") == 1
    assert sample(text, "libvirt_domain_migrations_total", direction="in", result="ok") == 1
    assert sample(text, "libvirt_domain_migration_start_timestamp_seconds", domain="g1", direction="in") is None
