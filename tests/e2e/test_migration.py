"""Live migration between two real hosts (issue 11, "Prove it"): no false restart, no false
alert, and the guest's policy travels with it.

Two extra libvirtds, host A and host B, each in its own mount + UTS namespace with its own
hostname and host UUID (:mod:`hostlib.twohosts`), each watched by its own ``virtwatch run``
with ``[policy] enabled = true`` and no match rule: the guests are managed only through
the ``<policy>`` element in their domain XML metadata, which migrates with them. The system
libvirtd at ``qemu:///system`` is never touched.

Guests are persistent and migrate live with ``PERSIST_DEST`` (the definition follows them;
the source keeps its shut-off copy, the classic two-definition setup in which a careless
source would start the guest a second time) and ``UNSAFE`` (the qcow2 is on a path both
hosts see, not on storage libvirt knows to be shared).

- ``test_round_trips``: a busy TCG guest (disk I/O, ARP, console ticks) goes A -> B -> A five
  times. After each move both daemons' APIs agree it runs on exactly one host (the source
  has it shut off with intent ``stopped`` and ``migrated_to`` set), the destination exports
  its block and interface counters under the same ``uuid``, the source's statistics series
  are gone, and the migration counters of the two hosts add up. Nothing restarts, nothing
  pages.
- ``test_failed_migration``: the same guest starts a migration to B throttled to 1 MiB/s;
  while it runs, A exports ``migrating="out"`` and its progress, B ``migrating="in"``; then it
  fails: ``virDomainAbortJob`` on A (``abort``), or B's incoming QEMU is killed (a destination
  that fails, ``destination-dies``). The guest keeps running on A with its intent untouched;
  both hosts count a failed migration; nothing restarts, nothing pages (B's incoming copy ends
  with ``STOPPED/FAILED``, which outside a migration is a QEMU failure).
- ``test_panic_after_migration``: a guest that panics PANIC_AFTER s after boot migrates to B
  first; B restarts it by the policy from its metadata; A, which still has the shut-off
  definition, does nothing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostlib import READY_MARKER, GuestImage, VirtwatchProcess, free_port, open_conn, sample
from hostlib.twohosts import MIGRATE_FLAGS, MigratableGuest, NamespacedHost, TwoHosts, make_guest

ROUND_TRIPS = 5
PANIC_AFTER = 40           # s after boot: the guest is on B by then
POLICY_NS = "https://virtwatch.dev/xmlns/policy/1"
METADATA = (f"<vw:policy xmlns:vw='{POLICY_NS}' on_crash='restart' restart_delay='1' restart_jitter='0' "
            "limit_burst='5' limit_interval='600'/>")
FLAGS = MIGRATE_FLAGS | libvirt.VIR_MIGRATE_PERSIST_DEST

CONFIG = """\
[daemon]
state_dir = "{state_dir}"
socket = "{socket}"
boot_id_file = "{boot_id_file}"

[log]
format = "json"
level = "info"

[policy]
enabled = true
mode = "enforce"
debounce = 0.2
boot_settle_timeout = 2
boot_settle_quiet = 0.5
start_delay = 0
"""


@dataclass
class Watched:
    """One host and the virtwatch that watches it."""

    host: NamespacedHost
    vw: VirtwatchProcess
    conn: libvirt.virConnect

    @property
    def tag(self) -> str:
        return self.host.name.upper()

    def guest(self, name: str) -> dict[str, Any] | None:
        status, body = self.vw.get(f"/api/v1/guests/{name}")
        return json.loads(body) if status == 200 else None

    def metric(self, name: str, **labels: str) -> float | None:
        return sample(self.vw.scrape(), name, **labels)

    def migrations(self, direction: str, result: str) -> int:
        return int(self.metric("libvirt_domain_migrations_total", direction=direction, result=result) or 0)

    def log(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return self.vw.log_records(event, **match)

    def acting_decisions(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.log("policy_decision", guest=name) if r.get("action") != "none"]


@dataclass
class Site:
    a: Watched
    b: Watched
    image: GuestImage
    guests: list[MigratableGuest]

    def other(self, w: Watched) -> Watched:
        return self.b if w is self.a else self.a


def _daemon(root: Path, host: NamespacedHost) -> VirtwatchProcess:
    d = root / f"vw-{host.name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "boot_id").write_text(f"boot-{host.name}\n")
    cfg = CONFIG.format(state_dir=d / "state", socket=d / "virtwatch.sock", boot_id_file=d / "boot_id")
    return VirtwatchProcess(d, cfg, uri=host.uri, poll_interval=1.0)


@pytest.fixture(scope="module")
def site(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    hosts = TwoHosts().start()
    root = tmp_path_factory.mktemp("migration")
    procs: list[VirtwatchProcess] = []
    conns: list[libvirt.virConnect] = []
    try:
        watched = []
        for host in (hosts.a, hosts.b):
            proc = _daemon(root, host)
            procs.append(proc)
            proc.start()
            conn = open_conn(host.uri)
            conns.append(conn)
            watched.append(Watched(host, proc, conn))
        s = Site(watched[0], watched[1], guest_image, [])
        yield s
        for w in watched:  # an orderly stop, with no error logged on the way
            rc = w.vw.stop()
            assert rc == 0, w.vw.log_tail()
            text = w.vw.log_text()
            assert "Traceback" not in text, text[-5000:]
            bad = [r for r in w.log("policy_worker_error")] + [
                json.loads(line) for line in text.splitlines()
                if line.startswith("{") and json.loads(line).get("level") in ("error", "critical")]
            assert not bad, bad
    finally:
        for proc in procs:
            proc.stop()
        for conn in conns:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        hosts.close()


def boot(site: Site, label: str, options: dict[str, object]) -> MigratableGuest:
    """Define and start a guest on host A; wait for its ready line and for A's daemon to see it."""
    g = make_guest(site.image, label, options=options, metadata=METADATA)
    site.guests.append(g)
    dom = site.a.conn.defineXML(g.xml)
    dom.create()
    g.wait_for_serial(READY_MARKER, 90)
    site.a.vw.wait_until(lambda: (site.a.guest(g.name) or {}).get("state") == "running", 30,
                         f"A never saw {g.name} running")
    return g


def migrate(src: Watched, dst: Watched, name: str, bandwidth_mib: int = 0) -> float:
    """Live-migrate on connections of its own (the caller may abort from another thread); seconds taken."""
    c_src, c_dst = open_conn(src.host.uri), open_conn(dst.host.uri)
    try:
        t0 = time.monotonic()
        c_src.lookupByName(name).migrate(c_dst, FLAGS, None, f"tcp://127.0.0.1:{free_port()}", bandwidth_mib)
        return time.monotonic() - t0
    finally:
        c_src.close()
        c_dst.close()


def wait_settled(src: Watched, dst: Watched, g: MigratableGuest) -> None:
    """Both daemons agree: running on ``dst`` (adopted, intent running), shut off on ``src``
    (intent stopped, migrated away); ``dst`` exports its disk and NIC counters, ``src`` none."""

    def settled() -> bool:
        d, s = dst.guest(g.name), src.guest(g.name)
        if not d or not s:
            return False
        dp, sp = d.get("policy") or {}, s.get("policy") or {}
        return (d["state"] == "running" and d.get("migrating") == "" and dp.get("intent") == "running"
                and dp.get("migrated_to") is None and dp.get("managed") is True
                and s["state"] == "shutoff" and s["reason"] == "migrated" and s.get("migrating") == ""
                and sp.get("intent") == "stopped" and sp.get("migrated_to") == "")

    dst.vw.wait_until(settled, 30, f"{src.tag} -> {dst.tag}: the daemons never agreed where {g.name} runs")

    last: dict[str, bool] = {}

    def series() -> bool:
        text_d, text_s = dst.vw.scrape(), src.vw.scrape()
        last.update({
            "dst info": sample(text_d, "libvirt_domain_info", domain=g.name, uuid=g.uuid, migrating="") == 1,
            "dst block": sample(text_d, "libvirt_domain_block_write_bytes_total", domain=g.name,
                                target="vda") is not None,
            "dst interface": sample(text_d, "libvirt_domain_interface_receive_bytes_total",
                                    domain=g.name) is not None,
            "src info": sample(text_s, "libvirt_domain_info", domain=g.name, uuid=g.uuid, migrating="") == 1,
            "src no block": sample(text_s, "libvirt_domain_block_write_bytes_total", domain=g.name) is None,
            "src no interface": sample(text_s, "libvirt_domain_interface_receive_bytes_total", domain=g.name) is None,
        })
        return all(last.values())

    try:
        dst.vw.wait_until(series, 15, f"{src.tag} -> {dst.tag}: {g.name}'s series did not move")
    except AssertionError as err:
        raise AssertionError(f"{[k for k, ok in last.items() if not ok]} {err}") from None


def assert_quiet(site: Site, name: str) -> None:
    """No restart decision, no instant alert, no restart counted, on either host."""
    for w in (site.a, site.b):
        assert w.acting_decisions(name) == [], (w.tag, w.acting_decisions(name))
        assert w.log("alert_fire") == [], (w.tag, w.log("alert_fire"))
        assert w.metric("libvirt_domain_restarts_total", domain=name) in (None, 0.0)


def test_round_trips(site: Site) -> None:
    g = boot(site, "migration-busy", {"io": 1, "net": 1, "tick": 1})
    src, dst = site.a, site.b
    took = []
    for move in range(1, 2 * ROUND_TRIPS + 1):
        took.append(migrate(src, dst, g.name))
        wait_settled(src, dst, g)
        # the counters add up: every move is one "out" on the source and one "in" on the destination
        a_out, a_in = site.a.migrations("out", "ok"), site.a.migrations("in", "ok")
        b_out, b_in = site.b.migrations("out", "ok"), site.b.migrations("in", "ok")
        assert (a_out, b_in) == ((move + 1) // 2, (move + 1) // 2), (move, a_out, b_in)
        assert (b_out, a_in) == (move // 2, move // 2), (move, b_out, a_in)
        assert a_out + b_out == a_in + b_in == move
        src, dst = dst, src
    assert src is site.a  # ten moves: back on A
    for w in (site.a, site.b):
        assert w.migrations("out", "failed") == w.migrations("in", "failed") == 0
    # the guest kept working through every move: its console ticks went on, on A again
    n = g.serial_text().count("VWTICK")
    site.a.vw.wait_until(lambda: g.serial_text().count("VWTICK") > n, 10, "the guest's ticks stopped")
    assert_quiet(site, g.name)
    print(f"\n[migration-e2e] {len(took)} live migrations: "
          f"{', '.join(f'{t:.1f}' for t in took)} s (mean {sum(took) / len(took):.2f} s)")


def _fail(how: str, a: Watched, b: Watched, name: str) -> None:
    """End the running migration of ``name`` from A to B badly: ``abort`` (``virsh domjobabort``
    on the source) or ``destination-dies`` (B's incoming QEMU is killed: a destination that fails)."""
    if how == "abort":
        conn = open_conn(a.host.uri)
        try:
            conn.lookupByName(name).abortJob()
        finally:
            conn.close()
        return
    pids = b.host.qemu_pids()
    assert len(pids) == 1, pids  # B runs nothing but the incoming copy
    os.kill(pids[0], signal.SIGKILL)


@pytest.mark.parametrize("how", ["abort", "destination-dies"])
def test_failed_migration(site: Site, how: str) -> None:
    g = site.guests[0]  # the busy guest, on A
    a, b = site.a, site.b
    before = {(w.tag, d, r): w.migrations(d, r) for w in (a, b) for d in ("in", "out") for r in ("ok", "failed")}
    intent_before = a.guest(g.name)["policy"]["intent"]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            migrate(a, b, g.name, bandwidth_mib=1)  # 128 MiB of RAM at 1 MiB/s: about two minutes
        except libvirt.libvirtError as err:
            failure.append(err)

    mover = threading.Thread(target=run)
    mover.start()
    try:
        def moving() -> bool:
            text_a, text_b = a.vw.scrape(), b.vw.scrape()
            return (sample(text_a, "libvirt_domain_info", domain=g.name, migrating="out") == 1
                    and (sample(text_a, "libvirt_domain_migration_data_remaining_bytes", domain=g.name,
                                direction="out") or 0) > 0
                    and sample(text_a, "libvirt_domain_migration_iteration", domain=g.name, direction="out") == 1
                    and sample(text_b, "libvirt_domain_info", domain=g.name, migrating="in") == 1)

        a.vw.wait_until(moving, 30, "the throttled migration never showed as running on both hosts")
        # a fleet-wide sum that leaves the incoming copy out counts the guest once while it moves
        text_a, text_b = a.vw.scrape(), b.vw.scrape()
        counted = [s.labels["migrating"] for text in (text_a, text_b)
                   for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "libvirt_domain_info" and s.labels.get("uuid") == g.uuid]
        assert sorted(counted) == ["in", "out"], counted
        remaining = sample(text_a, "libvirt_domain_migration_data_remaining_bytes", domain=g.name, direction="out")
        total = sample(text_a, "libvirt_domain_migration_data_total_bytes", domain=g.name, direction="out")
        assert total is not None and remaining is not None and 0 < remaining <= total
        assert sample(text_a, "libvirt_domain_migration_last_progress_timestamp_seconds", domain=g.name,
                      direction="out") is not None
        _fail(how, a, b, g.name)
    finally:
        mover.join(60)
    assert not mover.is_alive()
    assert len(failure) == 1, "the migration did not fail"
    if how == "abort":
        assert failure[0].get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED, failure

    def ended() -> bool:
        return (a.migrations("out", "failed") == before[("A", "out", "failed")] + 1
                and b.migrations("in", "failed") == before[("B", "in", "failed")] + 1
                and sample(a.vw.scrape(), "libvirt_domain_info", domain=g.name, migrating="") == 1)

    a.vw.wait_until(ended, 20, f"the failed migration ({how}) was not counted as failed on both hosts")
    ga = a.guest(g.name)
    assert ga["state"] == "running" and ga["policy"]["intent"] == intent_before == "running"
    assert ga["policy"]["migrated_to"] is None
    assert a.conn.lookupByName(g.name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert b.conn.lookupByName(g.name).state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert a.migrations("out", "ok") == before[("A", "out", "ok")]
    assert b.migrations("in", "ok") == before[("B", "in", "ok")]
    # B saw its incoming copy fail (STOPPED/FAILED): no QEMU failure for it, no restart
    assert ("STOPPED", "FAILED") in [(e["event"], e["detail"]) for e in b.guest(g.name)["events"]]
    time.sleep(3)  # a restart would come after restart_delay (1 s): give it the chance to be wrong
    assert b.conn.lookupByName(g.name).state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert_quiet(site, g.name)


def test_panic_after_migration(site: Site) -> None:
    g = boot(site, "migration-panic", {"panic": PANIC_AFTER})
    a, b = site.a, site.b
    migrate(a, b, g.name)
    wait_settled(a, b, g)
    assert PANIC_AFTER > 0 and "VW PANIC" not in g.serial_text(), "the guest panicked before it reached B"

    def restarted() -> bool:
        evs = [(e["event"], e["detail"]) for e in (b.guest(g.name) or {}).get("events", [])]
        return ("STOPPED", "CRASHED") in evs and evs[-1] == ("STARTED", "BOOTED")

    b.vw.wait_until(restarted, PANIC_AFTER + 40, "B never restarted the guest after its panic")
    decisions = b.log("policy_decision", guest=g.name, action="restart", cause="crash")
    assert decisions and "policy on_crash from metadata" in decisions[0]["msg"], decisions
    assert b.conn.lookupByName(g.name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert b.guest(g.name)["policy"]["restarts"] == {"crash": 1}
    # A did nothing: its copy stays shut off, no decision acted on it, no alert
    assert a.conn.lookupByName(g.name).state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED]
    assert a.acting_decisions(g.name) == [] and a.log("alert_fire") == []
    assert a.guest(g.name)["policy"]["intent"] == "stopped"
    # B paged for the panic (that is a real crash), and the alert carries its restart decision
    assert b.log("alert_fire", alertname="VirtwatchGuestCrashed", domain=g.name)
