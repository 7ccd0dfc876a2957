"""journald priorities (issue 13, item 3): ``<N>`` before each line when stdout is the journal.

systemd says the output is the journal by setting ``JOURNAL_STREAM=DEV:INODE`` to the
stream's device and inode. There is no systemd here (PID 1 is not systemd), so the tests
point the variable at a real file that the real daemon's stdout goes to: the same ``fstat``
comparison decides, on the same descriptor the journal would be. A variable inherited from a
parent whose output went elsewhere (another inode) must change nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from virtwatch.logs import configure_logging, writes_to_journal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_daemon(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """Run ``virtwatch run`` with a config that provokes one warning (``config_warning``); stop it
    after ``virtwatch_started``; return its stdout lines."""
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text(f'[libvirt]\nuri = "test:///default"\nmax_calls_in_flight = 2\n'
                   f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[daemon]\nstate_dir = "{tmp_path}/state"\nsocket = "{tmp_path}/vw.sock"\n')
    out = tmp_path / "out.log"
    with open(out, "wb") as fh:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream is not None:
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = journal_stream.format(dev=st.st_dev, ino=st.st_ino)
        proc = subprocess.Popen([sys.executable, "-m", "virtwatch", "run", "--config", str(cfg)], env=env,
                                stdout=fh, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 30
            while "virtwatch_started" not in out.read_text() and time.monotonic() < end:
                assert proc.poll() is None, out.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out.read_text().splitlines()


def by_event(lines: list[str]) -> dict[str, str]:
    return {json.loads(line[line.index("{"):])["event"]: line for line in lines if "{" in line}


def test_daemon_lines_carry_their_priority_when_stdout_is_the_journal(tmp_path: Path) -> None:
    lines = by_event(run_daemon(tmp_path, "{dev}:{ino}"))
    assert lines["config_warning"].startswith("<4>{")
    assert lines["virtwatch_started"].startswith("<6>{")
    assert lines["virtwatch_stopped"].startswith("<6>{")
    warning = json.loads(lines["config_warning"][3:])  # the message is the unchanged JSON object
    assert warning["level"] == "warning" and "max_calls_in_flight" in warning["message"]


def test_daemon_lines_are_plain_json_elsewhere(tmp_path: Path) -> None:
    plain = run_daemon(tmp_path, None)
    assert plain and all(line.startswith("{") for line in plain)
    (tmp_path / "inherited").mkdir()
    inherited = run_daemon(tmp_path / "inherited", "{dev}:{ino}1")
    assert inherited and all(line.startswith("{") for line in inherited)  # another inode: not the journal
    assert by_event(inherited)["config_warning"].startswith("{")


def test_every_level_maps_to_its_sd_daemon_priority(tmp_path: Path) -> None:
    import logging

    import structlog

    path = tmp_path / "journal"
    with open(path, "w") as fh:
        st = os.fstat(fh.fileno())
        configure_logging("json", "debug", stream=fh, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log = structlog.get_logger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("x")
        logging.getLogger("aiohttp.test").warning("stdlib %s", "line")
    try:
        got = path.read_text().splitlines()
        prefixes = [line[:3] for line in got]
        assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>", "<4>"]
        assert json.loads(got[5][3:])["exception"].count("\n") > 0  # the traceback stays inside one JSON line
        assert got[6] == "<4>WARNING aiohttp.test stdlib line"
    finally:
        configure_logging("json", "info")


def test_journal_stream_check_needs_a_matching_descriptor(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert writes_to_journal(a, env)
        assert not writes_to_journal(b, env)
        assert not writes_to_journal(a, {})
        assert not writes_to_journal(a, {"JOURNAL_STREAM": "garbage"})
        assert not writes_to_journal(a, {"JOURNAL_STREAM": f"{st.st_dev}:"})
        assert not writes_to_journal(object(), env)  # no descriptor (a StringIO, a test's capture)
