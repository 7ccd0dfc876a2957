"""One probe against a scripted agent: commands sent, answers read, deadlines kept."""

import asyncio
import itertools
import json

from virtwatch.agent.lane import AgentError
from virtwatch.liveness.probes import agent_return, exec_finished, run_probe
from virtwatch.policy.clock import FakeClock


class ScriptedAgent:
    """Answers agent commands from a script: each entry is an answer (JSON text), an
    AgentError to raise, or a number of seconds to spend before the next entry answers."""

    def __init__(self, clock: FakeClock, script: list) -> None:
        self.clock = clock
        self.script = list(script)
        self.sent: list[tuple[dict, float]] = []

    async def agent_command(self, name: str, command: str, timeout: float) -> str:
        self.sent.append((json.loads(command), timeout))
        while True:
            step = self.script.pop(0)
            if isinstance(step, (int, float)):
                if step > timeout:
                    await self.clock.sleep(timeout)
                    raise AgentError("timeout")
                await self.clock.sleep(step)
                continue
            if isinstance(step, Exception):
                raise step
            return step


def ok(ret) -> str:
    return json.dumps({"return": ret})


async def drive(clock: FakeClock, coro):
    """Run ``coro`` to its end, moving the fake clock to each next sleeper's deadline."""
    task = asyncio.ensure_future(coro)
    for _ in range(10_000):
        for _ in range(5):
            await asyncio.sleep(0)
        if task.done():
            return task.result()
        due = clock.next_deadline()
        if due is not None:
            await clock.advance(max(0.0, due - clock.monotonic()))
    raise AssertionError("never finished")


async def probe(clock, script, kind="exec", argv=("/bin/test", "-f", "/tmp/healthy"), timeout=5.0):
    agent = ScriptedAgent(clock, script)
    res = await drive(clock, run_probe(agent, "g", kind, argv, timeout, mono=clock.monotonic, wall=clock.time,
                                       sleep=clock.sleep))
    return res, agent.sent


async def test_exec_passes_on_exit_status_zero() -> None:
    clock = FakeClock()
    res, sent = await probe(clock, [ok({"pid": 42}), ok({"exited": False}), ok({"exited": True, "exitcode": 0})])
    assert (res.ok, res.reason, res.detail) == (True, "ok", "exit status 0")
    assert sent[0][0] == {"execute": "guest-exec", "arguments": {"path": "/bin/test", "arg": ["-f", "/tmp/healthy"],
                                                                "capture-output": False}}
    assert [c["execute"] for c, _ in sent[1:]] == ["guest-exec-status"] * 2
    assert sent[1][0]["arguments"] == {"pid": 42}
    assert res.duration == 0.05  # one poll interval waited


async def test_exec_fails_on_non_zero_status_and_signal() -> None:
    res, _ = await probe(FakeClock(), [ok({"pid": 1}), ok({"exited": True, "exitcode": 1})])
    assert (res.ok, res.reason, res.detail) == (False, "exit_status", "exit status 1")
    res, _ = await probe(FakeClock(), [ok({"pid": 1}), ok({"exited": True, "signal": 9})])
    assert (res.ok, res.reason, res.detail) == (False, "exit_status", "killed by signal 9")


async def test_exec_that_never_exits_times_out_within_the_deadline() -> None:
    clock = FakeClock()
    res, sent = await probe(clock, [ok({"pid": 7})] + [ok({"exited": False})] * 100, timeout=2.0)
    assert (res.ok, res.reason) == (False, "timeout")
    assert res.duration <= 2.0
    # each command is given only what is left of the probe's deadline
    assert all(b <= a for (_, a), (_, b) in itertools.pairwise(sent))


async def test_silent_agent_is_a_timeout_bounded_by_probe_timeout() -> None:
    clock = FakeClock()
    res, sent = await probe(clock, [30.0], kind="agent_ping", timeout=3.0)
    assert (res.ok, res.reason) == (False, "timeout")
    assert res.duration == 3.0 and sent[0] == ({"execute": "guest-ping"}, 3.0)


async def test_agent_errors_read_as_reasons() -> None:
    res, _ = await probe(FakeClock(), [AgentError("VIR_ERR_AGENT_UNRESPONSIVE")], kind="agent_ping")
    assert (res.ok, res.reason) == (False, "agent_unavailable")
    res, _ = await probe(FakeClock(), [AgentError("VIR_ERR_INTERNAL_ERROR", "boom")], kind="agent_ping")
    assert (res.ok, res.reason, res.detail) == (False, "agent_error", "VIR_ERR_INTERNAL_ERROR: boom")
    res, _ = await probe(FakeClock(), [json.dumps({"error": {"class": "GenericError", "desc": "no such file"}})])
    assert (res.ok, res.reason) == (False, "agent_error") and "GenericError: no such file" in res.detail
    res, _ = await probe(FakeClock(), [ok({})], kind="agent_ping")
    assert (res.ok, res.reason) == (True, "ok")
    res, _ = await probe(FakeClock(), [AgentError("not_connected", "no agent connection")], kind="agent_ping")
    assert (res.ok, res.reason, res.detail) == (False, "not_connected", "no agent connection")
    res, sent = await probe(FakeClock(), [], argv=())
    assert (res.ok, res.reason, sent) == (False, "misconfigured", [])


def test_answer_reading() -> None:
    assert agent_return('{"return": {"pid": 3}}') == {"pid": 3}
    for bad in ("[]", "nope", '{"x": 1}'):
        try:
            agent_return(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    assert exec_finished({"exited": False}) is None
    assert exec_finished({"exited": True, "exitcode": 0}) == (True, "exit status 0")
