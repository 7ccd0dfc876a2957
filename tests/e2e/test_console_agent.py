"""Console capture and the guest agent, end to end: virtwatch's Daemon in this
process (libvirtaio on the test loop) against real libvirtd + QEMU guests.

Figures (RSS, object counts, libvirtd clients, flood throughput) are printed
(``-s`` shows them); only the issue's explicit bounds are asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hostlib import GUEST_IP, URI, GuestFactory
from testkit import sample as value, scrape, until
from virtwatch.app import Daemon, reload
from virtwatch.cli import main as cli_main
from virtwatch.config import Settings, load_settings
from virtwatch.control import request as control_request

PAGE = 4096


def rss_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``), bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def libvirtd_clients(pid: int | None = None) -> int:
    """Clients connected to libvirtd's ``libvirtd`` server (``virt-admin
    srv-clients-list``); with ``pid``, only those of that process (``client-info``'s
    ``unix_process_id``: other test sessions share this libvirtd)."""
    def admin(*args: str) -> str:
        return subprocess.run(["virt-admin", "-c", "libvirtd:///system", *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout
    ids = [line.split()[0] for line in admin("srv-clients-list", "libvirtd").splitlines()[2:] if line.strip()]
    if pid is None:
        return len(ids)
    mine = 0
    for cid in ids:
        try:
            info = admin("client-info", "libvirtd", cid)
        except subprocess.CalledProcessError:
            continue  # disconnected meanwhile
        if f"unix_process_id: {pid}" in info:
            mine += 1
    return mine


def daemon_settings(state_dir: Path, **overrides: Any) -> Settings:
    base = {"libvirt.uri": URI, "libvirt.read_only": "no", "http.listen": "127.0.0.1:0",
            "stats.poll_interval": 5.0, "log.events": False, "daemon.state_dir": str(state_dir),
            "daemon.socket": str(state_dir / "vw.sock")}
    base.update(overrides)
    return load_settings(None, base)


@contextlib.asynccontextmanager
async def running_daemon(event_impl: Any, state_dir: Path, **overrides: Any) -> AsyncIterator[Daemon]:
    d = Daemon(daemon_settings(state_dir, **overrides), event_impl)
    await d.start()
    try:
        await asyncio.wait_for(d.connection.ready.wait(), 30)
        yield d
    finally:
        await d.stop()


@contextlib.asynccontextmanager
async def reloaded(d: Daemon, state_dir: Path, **overrides: Any) -> AsyncIterator[Daemon]:
    """What SIGHUP does: ``d`` replaced by a daemon with the new settings and ``d``'s state
    (stopping ``d`` again afterwards does nothing)."""
    fresh = await reload(d, daemon_settings(state_dir, **overrides))
    try:
        yield fresh
    finally:
        await fresh.stop()


async def create(factory: GuestFactory, label: str, **kw: Any) -> Any:
    return await asyncio.to_thread(factory.create, label, **kw)


async def test_crash_lines_are_recorded_and_served(event_impl: Any, guest_factory: GuestFactory,
                                                   tmp_path: Path) -> None:
    """A guest prints known lines then panics: the lines are in ``console-log
    --crash 1``, in the HTTP API and in the alert tail; the virtlogd serial
    log is read as well."""
    # selected by policy (capture_console in a [[policy.match]] rule; the policy engine is off)
    async with running_daemon(event_impl, tmp_path, **{
            "policy.match": [{"glob": "vwe2e-cpanic-*", "capture_console": True, "console_buffer": 32}]}) as d:
        guest = await create(guest_factory, "cpanic", options={"print": "TOKCRASH", "panic": 3}, persistent=True)
        name = guest.name
        await until(lambda: "VWLINE TOKCRASH 5" in guest.serial_text(), 30, "the guest printed its lines")
        await until(lambda: any("VWLINE TOKCRASH 5" in ln for ln in d.console.tail(name, 200)), 30, "lines captured")
        assert d.console.state(name)["buffer_capacity_bytes"] == 32 * 1024
        await until(lambda: d.console.store is not None and d.console.store.crash(name, 1) is not None
                    and len(d.console.store.crash(name, 1).events) >= 2, 60, "crash recorded")
        rec = d.console.store.crash(name, 1)
        assert rec.events[:2] == ["lifecycle:CRASHED/PANICKED", "lifecycle:STOPPED/CRASHED"]
        tail = rec.console_tail.split("\n")
        assert [f"VWLINE TOKCRASH {n}" for n in range(1, 6)] == [ln for ln in tail if ln.startswith("VWLINE")]
        assert any("Kernel panic" in ln for ln in tail)
        assert rec.log_file == str(guest.serial_log)
        assert "VW BOOT" in rec.log_tail  # from before virtwatch attached, via virtlogd's file
        alert_tail = d.console.tail(name)  # 20 lines for the alert annotation: the end of the crash output
        assert alert_tail == tail[-20:]
        captured = d.console.state(name)["bytes_total"]

        # A reload (SIGHUP) keeps the ring and its counters: the crash output is still there.
        async with reloaded(d, tmp_path, **{"stats.poll_interval": 4.0, "policy.match": [
                {"glob": "vwe2e-cpanic-*", "capture_console": True, "console_buffer": 32}]}) as d2:
            assert d2.settings.stats.poll_interval == 4.0
            assert d2.console.tail(name) == alert_tail
            assert d2.console.state(name)["bytes_total"] == captured
            # crash records are served on the operator socket (not on the HTTP port by default)
            status, body = await asyncio.to_thread(control_request, d2.settings.daemon.socket, "GET",
                                                   f"/v1/guests/{name}/console?crash=1")
            assert status == 200 and "VWLINE TOKCRASH 3" in body["crash"]["console_tail"]
            assert (await scrape(d2, f"/api/v1/guests/{name}/console?crash=1"))[0] == 404

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["console-log", name, "--crash", "1", "--state-dir", str(tmp_path)])
    assert rc == 0
    printed = out.getvalue()
    assert "VWLINE TOKCRASH 1" in printed and "VWLINE TOKCRASH 5" in printed
    assert "lifecycle:CRASHED/PANICKED" in printed
    print(f"\ncrash record {rec.id}: {len(tail)} console lines, {len(rec.log_tail.splitlines())} log lines")


async def test_console_flood_keeps_memory_bounded(event_impl: Any, guest_factory: GuestFactory,
                                                  tmp_path: Path) -> None:
    """10 MiB printed in one burst: everything is read, 64 KiB kept, RSS bounded."""
    flood = 10 * 1024 * 1024
    async with running_daemon(event_impl, tmp_path, **{
            "console.enabled": True, "console.guests": ["vwe2e-flood-*"]}) as d:
        gc.collect()
        rss0 = rss_bytes()
        guest = await create(guest_factory, "flood", options={"flood": flood}, wait=False)
        t0 = time.monotonic()
        peak = rss0

        def done() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes())
            return any("VW FLOOD DONE" in ln for ln in d.console.tail(guest.name, 3))

        await until(done, 300, "flood read")
        took = time.monotonic() - t0
        st = d.console.state(guest.name)
        gc.collect()
        rss1 = rss_bytes()
        print(f"\nflood: {st['bytes_total'] / 2**20:.1f} MiB read in {took:.1f} s, ring {st['buffered_bytes']} B, "
              f"dropped {st['bytes_dropped'] / 2**20:.1f} MiB; RSS {rss0 / 2**20:.1f} -> peak {peak / 2**20:.1f} "
              f"-> {rss1 / 2**20:.1f} MiB")
        if st["attaches"] == 1:
            assert st["bytes_total"] >= flood  # all of it: 'x' * flood plus the lines around it
        else:  # libvirtd restarted meanwhile (other sessions share it): output during the gap is gone
            assert st["bytes_total"] >= 0.8 * flood
        assert st["buffered_bytes"] == 64 * 1024
        assert peak - rss0 < 64 * 2**20  # bounded: a 10 MiB flood never sits in memory


FORCE_HOLDER = textwrap.dedent("""
    import sys, time, libvirt
    conn = libvirt.open(sys.argv[1])
    dom = conn.lookupByName(sys.argv[2])
    st = conn.newStream(0)
    dom.openConsole(None, st, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    print("HOLDING", flush=True)
    time.sleep(float(sys.argv[3]))
    st.abort()
    conn.close()
    print("RELEASED", flush=True)
""")


async def test_forced_takeover_then_reattach(event_impl: Any, guest_factory: GuestFactory, tmp_path: Path) -> None:
    """Another process takes the console with FORCE (what ``virsh console
    --force`` does): virtwatch lets go, backs off while it is held, and
    re-attaches once it is free; it never forces the console itself."""
    async with running_daemon(event_impl, tmp_path, **{
            "console.enabled": True, "console.guests": ["vwe2e-force-*"],
            "console.reattach_min_delay": 0.2, "console.reattach_max_delay": 1.0}) as d:
        guest = await create(guest_factory, "force", options={"tick": 0.3})
        name = guest.name
        await until(lambda: any(ln.startswith("VWTICK") for ln in d.console.tail(name, 5)), 30, "ticks")
        assert d.console.state(name)["attaches"] == 1
        holder = await asyncio.create_subprocess_exec(sys.executable, "-c", FORCE_HOLDER, URI, name, "4",
                                                      stdout=asyncio.subprocess.PIPE)
        assert (await holder.stdout.readline()).strip() == b"HOLDING"
        await until(lambda: d.console.state(name)["ends"] >= 1, 10, "our stream closed")
        await until(lambda: d.console.state(name)["busy"] >= 1, 10, "console busy while held")
        assert d.console.attached() == []
        assert (await holder.stdout.readline()).strip() == b"RELEASED"
        await holder.wait()
        took = await until(lambda: d.console.state(name)["attaches"] >= 2, 15, "re-attached")
        last = [ln for ln in d.console.tail(name, 50) if ln.startswith("VWTICK")][-1]
        await until(lambda: [ln for ln in d.console.tail(name, 50) if ln.startswith("VWTICK")][-1] != last, 5,
                    "new output after re-attach")
        st = d.console.state(name)
        print(f"\ntakeover: ends={st['ends']} (eof {st['eofs']}) busy={st['busy']} attaches={st['attaches']}, "
              f"re-attached {took:.1f} s after release")


def _vm_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_200_attach_detach_cycles_do_not_leak(event_impl: Any, guest_factory: GuestFactory,
                                                    tmp_path: Path) -> None:
    """200 attach/read/detach cycles on a real guest: daemon RSS, Python object
    count and libvirtd's client count stay flat; after the daemon stops,
    libvirtd has no client of ours left (a leaked stream would keep its
    connection alive)."""
    clients_before_daemon = libvirtd_clients(os.getpid())
    async with running_daemon(event_impl, tmp_path, **{
            "console.enabled": True, "console.guests": []}) as d:  # we drive attach/detach by hand
        guest = await create(guest_factory, "cycle", options={"tick": 0.05})
        name = guest.name
        figures = []

        async def cycle() -> None:
            assert await d.console.attach(name) == "attached"
            for _ in range(3):
                d.console.read_available(name)
                await asyncio.sleep(0.01)
            await d.console.detach(name)

        for _ in range(20):  # warm-up: caches, allocator arenas, structlog
            await cycle()
        base = (rss_bytes(), _vm_objects(), libvirtd_clients(os.getpid()))
        base_callbacks = d.impl.live_callbacks()
        figures.append((20, *base))
        for i in range(21, 201):
            await cycle()
            if i % 60 == 0 or i == 200:
                figures.append((i, rss_bytes(), _vm_objects(), libvirtd_clients(os.getpid())))
        st = d.console.state(name)
        assert st["attaches"] == 200
        assert any(ln.startswith("VWTICK") for ln in d.console.tail(name, 10))
        end = figures[-1]
        print("\ncycles  rss_MiB  py_objects  libvirtd_clients")
        for n, rss, objs, clients in figures:
            print(f"{n:6d}  {rss / 2**20:7.1f}  {objs:10d}  {clients:16d}")
        assert end[3] == base[2]  # no client added by the cycles
        assert end[2] - base[1] < 2000  # flat: a leak of one object per cycle would already show 180
        assert end[1] - base[0] < 8 * 2**20
        # no stream handle/timer left registered per cycle (each lane's connection has its own
        # socket handle and keepalive timer, so compare with the count before the cycles)
        assert d.impl.live_callbacks() <= base_callbacks
    await until(lambda: libvirtd_clients(os.getpid()) <= clients_before_daemon, 10, "daemon client gone")
    print(f"libvirtd clients: before daemon {clients_before_daemon}, after stop {libvirtd_clients(os.getpid())}")


async def test_guest_agent_hostname_address_and_disconnect(event_impl: Any, guest_factory: GuestFactory,
                                                           tmp_path: Path) -> None:
    """qemu-ga in the guest: hostname, OS and the guest IP appear in the
    metrics; the agent is killed in the guest → connected goes to 0."""
    async with running_daemon(event_impl, tmp_path, **{"agent.interval": 1.0}) as d:
        guest = await create(guest_factory, "agent", agent=True,
                             options={"agent": 1, "net": 1, "hostname": "vwagenthost", "agent_kill_after": 35})
        name = guest.name

        def ip_known() -> bool:
            i = d.agent.info(name)
            return i is not None and i.hostname == "vwagenthost" and any(
                a.address == GUEST_IP and a.source == "agent" for a in i.addresses)

        took = await until(ip_known, 40, "agent info")
        _, text = await scrape(d)
        assert value(text, "libvirt_domain_guest_agent_connected", domain=name) == 1
        assert value(text, "libvirt_domain_guest_info", domain=name, hostname="vwagenthost") == 1
        assert value(text, "libvirt_domain_interface_address_info", domain=name, interface="eth0",
                     address=GUEST_IP, family="ipv4") == 1
        offset = value(text, "libvirt_domain_guest_time_offset_seconds", domain=name)
        assert offset is not None and abs(offset) < 60
        status, body = await scrape(d, f"/api/v1/guests/{name}")
        assert status == 200 and "vwagenthost" in body
        info = d.agent.info(name)
        print(f"\nagent: info after {took:.1f} s: hostname={info.hostname} os={info.os_name!r} "
              f"version={info.os_version!r} tz={info.timezone!r} offset={info.time_offset:.3f} s "
              f"addresses={[(a.interface, a.address) for a in info.addresses]} errors={info.errors}")
        # A reload (SIGHUP) keeps what the agent said: shown at once, before any new refresh.
        async with reloaded(d, tmp_path, **{"agent.interval": 1.5}) as d:
            assert d.agent.info(name) is not None and d.agent.info(name).hostname == "vwagenthost"
            _, text = await scrape(d)
            assert value(text, "libvirt_domain_guest_info", domain=name, hostname="vwagenthost") == 1
            await until(lambda: "VW AGENT KILL" in guest.serial_text(), 40, "agent killed in the guest")
            await until(lambda: d.guests.by_name(name).agent_connected is False, 15, "agent disconnected")
            _, text = await scrape(d)
            assert value(text, "libvirt_domain_guest_agent_connected", domain=name) == 0
            assert value(text, "libvirt_domain_guest_info", domain=name) is None
            assert d.agent.max_in_flight_seen == 1

