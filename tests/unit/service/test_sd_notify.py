"""sd_notify protocol against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtwatch.systemd import Notifier, monotonic_usec, watchdog_task


class Receiver:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 2.0) -> list[str]:
        """One datagram, split into its lines (the trailing newline dropped)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        assert data.endswith(b"\n")
        return data.decode().rstrip("\n").split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().rstrip("\n").split("\n"))
        except BlockingIOError:
            return out


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"virtwatch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_no_notify_socket_is_a_silent_noop() -> None:
    n = Notifier.from_environ({})
    assert n.enabled is False
    assert n.address is None
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_ready_with_status_on_path_socket(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    assert n.address == os.fsencode(path_receiver.env_value)
    assert n.ready(status="listening on :9177") is True
    assert path_receiver.recv() == ["READY=1", "STATUS=listening on :9177"]


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": abstract_receiver.env_value})
    assert n.address is not None and n.address.startswith(b"\0")
    assert n.stopping() is True
    assert abstract_receiver.recv() == ["STOPPING=1"]


def test_reloading_sends_monotonic_usec(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    before = monotonic_usec()
    assert n.reloading(status="reloading configuration") is True
    after = monotonic_usec()
    lines = path_receiver.recv()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    # CLOCK_MONOTONIC in µs, not CLOCK_REALTIME nor ns.
    assert abs(int(value) - time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6) < 5e6
    assert lines[2] == "STATUS=reloading configuration"


def test_status_newlines_are_flattened(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    assert n.status("connected\n3 guests") is True
    assert path_receiver.recv() == ["STATUS=connected 3 guests"]


def test_extend_timeout(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    assert n.extend_timeout(2.5) is True
    assert path_receiver.recv() == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_invalid_field_is_a_programming_error(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value})
    with pytest.raises(ValueError):
        n.notify("READY=1\nWATCHDOG=1")
    with pytest.raises(ValueError):
        n.notify("READY")


def test_watchdog_interval_is_half_of_watchdog_usec(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "30000000"}
    n = Notifier.from_environ(env, pid=1234)
    assert n.watchdog_usec == 30_000_000
    assert n.watchdog_interval() == 15.0
    assert n.watchdog() is True
    assert path_receiver.recv() == ["WATCHDOG=1"]


def test_watchdog_pid_for_another_process_disables_watchdog(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4321"}
    n = Notifier.from_environ(env, pid=1234)
    assert n.watchdog_interval() is None
    assert n.watchdog() is False
    # Other notifications still work.
    assert n.ready() is True
    assert path_receiver.recv() == ["READY=1"]


def test_watchdog_pid_matching_us_enables_watchdog(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_environ(env)  # default pid is os.getpid()
    assert n.watchdog_interval() == 1.0


@pytest.mark.parametrize("value", ["0", "-5", "soon", ""])
def test_bad_watchdog_usec_disables_watchdog(path_receiver: Receiver, value: str) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": value}, pid=1)
    assert n.watchdog_interval() is None


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_address_gives_disabled_notifier(value: str) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert n.enabled is False
    assert n.ready() is False


def test_unset_environment_removes_variables(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "77", "HOME": "/root"}
    n = Notifier.from_environ(env, pid=77, unset_environment=True)
    assert env == {"HOME": "/root"}
    assert n.watchdog_interval() == 0.5


def test_send_to_vanished_socket_returns_false(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled is True
    assert n.ready() is False  # ENOENT is logged, not raised


async def test_watchdog_task_pings_at_half_interval(path_receiver: Receiver) -> None:
    # WATCHDOG_USEC=0.2 s -> a ping every 0.1 s.
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "200000"}, pid=9)
    task = asyncio.create_task(watchdog_task(n, lambda: True))
    await asyncio.sleep(0.55)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = path_receiver.pending()
    assert all(d == ["WATCHDOG=1"] for d in got)
    assert 5 <= len(got) <= 7  # t=0, 0.1, ... 0.5


async def test_watchdog_task_withholds_pings_while_unhealthy(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "100000"}, pid=9)
    healthy = {"now": True}
    task = asyncio.create_task(watchdog_task(n, lambda: healthy["now"]))
    await asyncio.sleep(0.12)
    first = path_receiver.pending()
    assert len(first) >= 2
    healthy["now"] = False
    await asyncio.sleep(0.06)  # let the tick that may already be due pass
    path_receiver.pending()
    await asyncio.sleep(0.3)
    assert path_receiver.pending() == []  # six ticks, no ping
    healthy["now"] = True
    await asyncio.sleep(0.12)
    assert len(path_receiver.pending()) >= 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_task_treats_failing_health_check_as_unhealthy(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "100000"}, pid=9)

    def broken() -> bool:
        raise RuntimeError("health check broke")

    task = asyncio.create_task(watchdog_task(n, broken))
    await asyncio.sleep(0.2)
    assert not task.done()  # the task survives the exception
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert path_receiver.pending() == []


async def test_wedged_loop_stops_pings(path_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "100000"}, pid=9)
    task = asyncio.create_task(watchdog_task(n, lambda: True))
    await asyncio.sleep(0.01)
    path_receiver.pending()
    time.sleep(0.4)  # block the loop: nothing may be sent meanwhile
    assert path_receiver.pending() == []
    await asyncio.sleep(0.01)  # loop runs again -> the overdue ping goes out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    resumed = path_receiver.pending()
    assert resumed and all(d == ["WATCHDOG=1"] for d in resumed)


async def test_watchdog_task_returns_when_watchdog_off() -> None:
    n = Notifier.from_environ({})
    await asyncio.wait_for(watchdog_task(n, lambda: True), timeout=1)


async def test_watchdog_task_rejects_nonpositive_interval() -> None:
    with pytest.raises(ValueError):
        await watchdog_task(Notifier.from_environ({}), lambda: True, interval=0)


def test_listen_fds_ignores_what_is_not_ours_and_unsets_the_variables() -> None:
    from virtwatch.systemd import listen_fds

    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "OTHER": "x"}
    assert listen_fds(env, pid=1111) == {}  # meant for another process
    assert env == {"OTHER": "x"}            # and never handed down to children
    for bad in ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, {"LISTEN_PID": "7", "LISTEN_FDS": "many"},
                {"LISTEN_PID": "7", "LISTEN_FDS": "0"}, {"LISTEN_PID": "7"}, {}):
        assert listen_fds(dict(bad), pid=7) == {}
    kept = {"LISTEN_PID": "7", "LISTEN_FDS": "0"}
    listen_fds(kept, pid=7, unset_environment=False)
    assert kept == {"LISTEN_PID": "7", "LISTEN_FDS": "0"}


def test_listen_fds_names_each_passed_socket() -> None:
    # a child process finds two sockets at fds 3 and 4, as systemd passes them
    code = ("import json, os\nfrom virtwatch.systemd import listen_fds\n"
            "env = dict(os.environ, LISTEN_PID=str(os.getpid()))\n"
            "got = listen_fds(env, os.getpid())\n"
            "print(json.dumps({'got': got, 'inheritable': [os.get_inheritable(fd) for fd in got.values()],"
            " 'left': sorted(k for k in env if k.startswith('LISTEN_'))}))\n")
    a, b = socket.socketpair()
    c, d = socket.socketpair()

    def place() -> None:  # in the child, before exec: dup2'd descriptors are inheritable
        os.dup2(a.fileno(), 3)
        os.dup2(c.fileno(), 4)

    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:"},
                             preexec_fn=place, close_fds=False)
    finally:
        for s in (a, b, c, d):
            s.close()
    assert out.returncode == 0, out.stderr
    # an empty name is "unknown", as in sd_listen_fds_with_names(3); both end close-on-exec
    assert json.loads(out.stdout) == {"got": {"control": 3, "unknown": 4}, "inheritable": [False, False], "left": []}
