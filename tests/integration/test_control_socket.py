"""Operator commands (status/explain/hold/release/reset/events) against a running daemon.

The daemon runs in this process on the test driver with policy enabled; the
real ``virtwatch`` CLI runs as a subprocess and talks to its Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import AsyncIterator

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
