"""One liveness probe through the guest agent: the commands, and how their answers read.

``agent_ping`` sends ``guest-ping``; ``exec`` sends ``guest-exec`` (``probe_command``, no
output captured) and then polls ``guest-exec-status`` until the process exited or the probe's
deadline passed. Every command goes through ``virDomainQemuAgentCommand``
(``libvirt_qemu.qemuAgentCommand``) on the agent's lane
(:meth:`~virtwatch.agent.lane.GuestAgent.agent_command`), each bounded by what is left of
``probe_timeout``: a probe never takes longer than its own deadline, whatever the agent does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..agent.lane import AgentError

#: Polls of ``guest-exec-status``: first after this many seconds, doubling up to the cap.
EXEC_POLL_FIRST = 0.05
EXEC_POLL_MAX = 0.5


class AgentPort(Protocol):
    """What a probe needs from the agent's lane."""

    async def agent_command(self, name: str, command: str, timeout: float) -> str:
        """Send one agent command (JSON text) to guest ``name`` within ``timeout`` seconds;
        returns the agent's JSON answer. Raises :class:`AgentError`."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome.

    ``reason``: ``ok``; ``exit_status`` (the command ran and failed: ``detail`` has its status),
    ``timeout`` (no answer within ``probe_timeout``), ``agent_unavailable`` (no agent
    channel, or its agent is not connected), ``agent_error`` (any other agent or libvirt
    error), ``misconfigured`` (exec without ``probe_command``). ``duration``: seconds;
    ``at``: wall time it ended.
    """

    ok: bool
    reason: str
    detail: str
    duration: float
    at: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


#: Agent error codes that mean "there is no agent to ask".
_UNAVAILABLE = frozenset({"VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_ERR_AGENT_UNRESPONSIVE"})

#: Reasons that are about virtwatch's side, not the guest: no libvirt connection for the agent's
#: lane (libvirtd restarting, a read-only connection), the lane busy with other guests for the
#: whole probe_timeout, or an exec probe with no command (check-config warns of it). Such a
#: probe says nothing about the guest: it is not counted.
OUR_SIDE = frozenset({"not_connected", "lane_busy", "misconfigured"})


def ping_command() -> str:
    """``guest-ping``."""
    return json.dumps({"execute": "guest-ping"})


def exec_command(argv: tuple[str, ...]) -> str:
    """``guest-exec`` of ``argv`` (path + args), output not captured."""
    return json.dumps({"execute": "guest-exec",
                       "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": False}})


def exec_status_command(pid: int) -> str:
    """``guest-exec-status`` of ``pid``."""
    return json.dumps({"execute": "guest-exec-status", "arguments": {"pid": pid}})


def agent_return(answer: str) -> Any:
    """The ``return`` member of an agent answer. Raises ValueError for an ``error`` answer or
    text that is not an agent answer."""
    try:
        doc = json.loads(answer)
    except ValueError as err:
        raise ValueError(f"not JSON: {answer[:200]!r}") from err
    if not isinstance(doc, dict):
        raise ValueError(f"not an agent answer: {answer[:200]!r}")
    if "error" in doc:
        fault = doc["error"] or {}
        raise ValueError(f"{fault.get('class', 'error')}: {fault.get('desc', '')}".strip())
    if "return" not in doc:
        raise ValueError(f"no return member: {answer[:200]!r}")
    return doc["return"]


def exec_finished(status: Any) -> tuple[bool, str] | None:
    """Read a ``guest-exec-status`` return: None while the process runs, else ``(passed,
    detail)``: passed when it exited with status 0; detail ``exit status N`` or ``signal N``."""
    if not isinstance(status, dict) or not status.get("exited"):
        return None
    if status.get("signal") is not None:
        return False, f"killed by signal {status['signal']}"
    code = int(status.get("exitcode", -1))
    return code == 0, f"exit status {code}"


async def run_probe(agent: AgentPort, name: str, kind: str, argv: tuple[str, ...], timeout: float,
                    mono: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> ProbeResult:
    """Run one probe of ``kind`` (``agent_ping`` or ``exec``) on guest ``name`` within
    ``timeout`` seconds. Never raises (every failure is a :class:`ProbeResult`)."""
    start = mono()
    deadline = start + timeout

    def result(ok: bool, reason: str, detail: str) -> ProbeResult:
        return ProbeResult(ok, reason, detail, round(mono() - start, 6), wall())

    def left() -> float:
        return deadline - mono()

    try:
        if kind == "agent_ping":
            agent_return(await agent.agent_command(name, ping_command(), left()))
            return result(True, "ok", "guest-ping answered")
        if not argv:
            return result(False, "misconfigured", "probe = 'exec' without probe_command")
        pid = int(agent_return(await agent.agent_command(name, exec_command(argv), left()))["pid"])
        delay = EXEC_POLL_FIRST
        while True:
            done = exec_finished(agent_return(await agent.agent_command(name, exec_status_command(pid), left())))
            if done is not None:
                return result(done[0], "ok" if done[0] else "exit_status", done[1])
            if left() <= delay:
                return result(False, "timeout", f"{argv[0]} still running after {timeout:g} s")
            await sleep(delay)
            delay = min(EXEC_POLL_MAX, delay * 2)
    except AgentError as err:
        if err.code in OUR_SIDE:
            return result(False, err.code, err.message or err.code)
        if err.code == "timeout":
            return result(False, "timeout", f"no answer within {timeout:g} s")
        reason = "agent_unavailable" if err.code in _UNAVAILABLE else "agent_error"
        return result(False, reason, str(err))
    except (ValueError, KeyError, TypeError) as err:
        return result(False, "agent_error", f"unexpected answer: {err}")
