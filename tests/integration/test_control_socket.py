"""Operator commands (status/explain/hold/release/reset/override/events) against a running daemon.

The daemon runs in this process on the test driver with policy enabled; the
real ``virtwatch`` CLI runs as a subprocess and talks to its Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest_asyncio

from testkit import until
from virtwatch.app import Daemon
from virtwatch.config import settings_from_mapping
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl


@pytest_asyncio.fixture
async def policy_daemon(event_impl: ThreadSafeAsyncIOImpl, tmp_path: Path) -> AsyncIterator[Daemon]:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    settings = settings_from_mapping({
        "libvirt": {"uri": "test:///default"},
        "http": {"listen": "127.0.0.1:0"},
        "stats": {"poll_interval": 1.0},
        "log": {"events": False},
        "daemon": {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "run" / "vw.sock"),
                   "boot_id_file": str(boot_id)},
        "policy": {"enabled": True, "debounce": 0.05, "boot_settle_quiet": 0.1, "boot_settle_timeout": 1.0,
                   "match": [{"glob": "ctl-*", "restart_delay": 1.0}]},
    })
    d = Daemon(settings, event_impl)
    await d.start()
    await d.connection.ready.wait()
    yield d
    await d.stop()


async def cli(d: Daemon, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtwatch", *args, "--socket", d.settings.daemon.socket,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_operator_commands(policy_daemon: Daemon, make_guests) -> None:
    d = policy_daemon
    mode = stat.S_IMODE(os.stat(d.settings.daemon.socket).st_mode)
    assert mode == 0o660
    (dom,) = await asyncio.to_thread(make_guests, "ctl", 1, True)
    name = dom.name()
    await until(lambda: name in d.policy.engine.snapshot().guests)
    # actions run on the policy's own connection and thread, never behind statistics calls;
    # it opens once the main connection is ready, so it may still be opening here
    await until(lambda: d.policy_side.conn is not None, 10.0, "policy side connection open")
    assert d.policy_side.conn is not None and d.policy_side.conn is not d.connection.conn

    rc, out, err = await cli(d, "status", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["connected"] is True and doc["policy_enabled"] is True
    entry = next(g for g in doc["guest_list"] if g["name"] == name)
    assert entry["state"] == "running" and entry["policy"]["managed"] is True

    rc, out, _ = await cli(d, "explain", name)
    assert rc == 0
    assert "managed: yes" in out
    assert "restart_delay = 1.0  [match[0]" in out or "restart_delay = 1.0  [match" in out
    assert "on_crash = 'restart'  [defaults]" in out

    # an admin destroy is left alone: intent becomes stopped, no restart
    await asyncio.to_thread(dom.destroy)
    await until(lambda: d.policy.engine.snapshot().guests[name].intent == "stopped")
    await asyncio.sleep(1.5)
    assert (await asyncio.to_thread(dom.state))[0] == libvirt.VIR_DOMAIN_SHUTOFF

    rc, out, err = await cli(d, "hold", name)
    assert rc == 0 and "intent=held" in out, err
    assert d.policy.engine.snapshot().guests[name].intent == "held"
    rc, out, _ = await cli(d, "release", name)
    assert rc == 0
    assert d.policy.engine.snapshot().guests[name].intent == "stopped"
    rc, out, _ = await cli(d, "reset", name)
    assert rc == 0

    rc, out, _ = await cli(d, "status", name)
    assert rc == 0 and f"{name} (" in out and "intent=stopped" in out
    rc, out, _ = await cli(d, "events", "--limit", "5")
    assert rc == 0 and "lifecycle" in out

    rc, _, err = await cli(d, "hold", "no-such-guest")
    assert rc == 3 and "no guest named" in err

    # policy metrics are exported
    body = await d.exposition.render_async()
    info = f'virtwatch_policy_guest_info{{domain="{name}",intent="stopped",managed="true",mode="enforce"}} 1.0'
    assert info.encode() in body
    assert f'virtwatch_policy_given_up{{domain="{name}"}} 0.0'.encode() in body
    assert b'virtwatch_collector_success{collector="policy"} 1.0' in body


async def test_unreachable_daemon_and_disabled_policy(daemon: Daemon, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "virtwatch", "status", "--socket",
                                                str(tmp_path / "nothing.sock"), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"cannot reach the daemon" in err


async def test_domain_metadata_opts_a_guest_into_console_capture(policy_daemon: Daemon, make_guests) -> None:
    # capture_console from the guest's own XML metadata: the engine reads it on the
    # METADATA_CHANGE event and the console capture picks the guest up at once
    d = policy_daemon
    (dom,) = await asyncio.to_thread(make_guests, "ctl", 1, True)
    name = dom.name()
    await until(lambda: name in d.policy.engine.snapshot().guests)
    assert not d.console.wants(name) and d.console.state(name) is None
    xml = ('<policy xmlns="https://virtwatch.dev/xmlns/policy/1">'
           '<capture_console>true</capture_console><console_buffer>16</console_buffer></policy>')
    await asyncio.to_thread(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "virtwatch",
                            "https://virtwatch.dev/xmlns/policy/1", 0)
    await until(lambda: d.console.state(name) is not None)
    assert d.console.wants(name)
    assert d.policy.engine.console_capture(name) == 16
    # the test driver has no consoles: the capture keeps trying, with backoff, and says why
    await until(lambda: d.console.state(name)["attaches"] == 0 and d.console.state(name)["last_error"])


async def test_runtime_override_over_the_socket_and_the_cli(policy_daemon: Daemon, make_guests) -> None:
    d = policy_daemon
    (dom,) = await asyncio.to_thread(make_guests, "ctl", 1, True)
    name = dom.name()
    await until(lambda: name in d.policy.engine.snapshot().guests)

    rc, out, err = await cli(d, "override", name, "restart_delay=7", "on_crash=leave", "mode=dry-run",
                             "on_host_shutdown=managedsave:30,destroy:5", "capture_console=false")
    assert rc == 0, err
    assert out.startswith(f"{name}: override set:") and "restart_delay=7.0" in out and "mode='dry-run'" in out
    want = {"restart_delay": 7.0, "on_crash": "leave", "mode": "dry-run", "capture_console": False,
            "on_host_shutdown": [{"action": "managedsave", "timeout": 30.0}, {"action": "destroy", "timeout": 5.0}]}
    assert dict((await d.policy.store.get_guest(name)).override) == want  # persisted: survives a restart
    snap = d.policy.engine.snapshot().guests[name]
    assert snap.mode == "dry-run" and snap.managed
    rc, out, _ = await cli(d, "explain", name)
    assert rc == 0
    assert "restart_delay = 7.0  [override]" in out and "on_crash = 'leave'  [override]" in out
    assert "mode: dry-run (from override)" in out
    assert "limit_burst = 5  [defaults]" in out
    rc, out, _ = await cli(d, "status", name, "--json")
    assert rc == 0 and json.loads(out)["policy"]["override"] == want
    rc, out, _ = await cli(d, "status", name)
    assert rc == 0 and "  override: " in out and "restart_delay=7.0" in out

    # bad input: exit 2, every problem named, the override in force unchanged
    for args, says in ((["no_such_key=1"], "no_such_key: unknown key"),
                       (["restart_delay=-1"], "restart_delay: Input should be greater than or equal to 0"),
                       (["limit_burst=many"], "limit_burst: Input should be a valid integer"),
                       (["mode=fast"], "mode: 'fast' is not one of enforce, dry-run, observe"),
                       (["profile=nope"], "profile: unknown profile 'nope'"),
                       (["restart_delay"], "expected KEY=VALUE"),
                       (["restart_delay=1", "restart_delay=2"], "restart_delay given twice"),
                       ([], "give KEY=VALUE pairs or --clear"),
                       (["restart_delay=1", "--clear"], "--clear takes no KEY=VALUE pairs")):
        rc, out, err = await cli(d, "override", name, *args)
        assert rc == 2 and says in err, (args, rc, err)
    assert dict((await d.policy.store.get_guest(name)).override) == want

    rc, _, err = await cli(d, "override", "no-such-guest", "restart_delay=1")
    assert rc == 3 and "no guest named 'no-such-guest'" in err

    # a guest no rule matches becomes managed by an override (observe mode here: hands off)
    await until(lambda: "test" in d.policy.engine.snapshot().guests)
    assert not d.policy.engine.snapshot().guests["test"].managed
    rc, _, err = await cli(d, "override", "test", "mode=observe")
    assert rc == 0, err
    assert d.policy.engine.snapshot().guests["test"].managed
    rc, _, err = await cli(d, "override", "test", "--clear")
    assert rc == 0 and not d.policy.engine.snapshot().guests["test"].managed

    # the socket itself: the body must be a JSON object
    from virtwatch.control import request
    sock = d.settings.daemon.socket
    status, body = await asyncio.to_thread(request, sock, "PUT", f"/v1/guests/{name}/override", ["restart_delay"])
    assert status == 400 and "JSON object" in body["error"]
    status, body = await asyncio.to_thread(request, sock, "PUT", f"/v1/guests/{name}/override",
                                           {"mode": ["dry-run"], "profile": {"a": 1}})
    assert status == 400 and "mode: ['dry-run'] is not one of" in body["error"]
    assert "profile: unknown profile {'a': 1}" in body["error"]
    status, body = await asyncio.to_thread(request, sock, "PUT", f"/v1/guests/{name}/override", {"priority": 3})
    assert status == 200 and body["policy"]["override"] == {"priority": 3}  # replaces, does not merge

    rc, out, err = await cli(d, "override", name, "--clear")
    assert rc == 0 and out.strip() == f"{name}: override cleared", err
    assert dict((await d.policy.store.get_guest(name)).override) == {}
    rc, out, _ = await cli(d, "explain", name)
    assert "restart_delay = 1.0  [match[0]" in out and "mode: enforce (from policy.mode)" in out


async def test_override_needs_the_policy_engine(daemon: Daemon, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtwatch", "override", "test", "restart_delay=1", "--socket",
        daemon.settings.daemon.socket, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 4 and b"policy is disabled" in err
