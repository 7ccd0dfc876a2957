"""``[policy]`` configuration: modes, guards, boot flow, per-guest policy keys.

Layout in TOML::

    [policy]                      # engine-wide: enabled, mode, guards, boot flow
    enabled = true
    mode = "enforce"              # enforce | dry-run | observe

    [policy.defaults]             # per-guest keys (GuestPolicy), lowest precedence
    restart_delay = 5.0

    [policy.profile.critical]     # named overlays of per-guest keys
    limit_burst = 10

    [[policy.match]]              # selectors + profile + mode + any per-guest key
    glob = "web*"
    profile = "critical"
    on_poweroff = "restart"

Every model is frozen and forbids unknown keys. Durations are seconds (float),
sizes are as documented per key. Precedence of the layers is implemented in
:mod:`virtwatch.policy.select`.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    create_model,
    field_validator,
    model_validator,
)

Mode = Literal["enforce", "dry-run", "observe"]
StopReaction = Literal["restart", "leave"]
IoErrorReaction = Literal["leave", "resume", "kill"]
RestoreFailure = Literal["keep", "discard", "force-boot"]
IntentDefault = Literal["auto", "running", "stopped"]
Autostart = Literal["never", "was-running", "always"]
ShutdownAction = Literal["managedsave", "shutdown", "destroy"]
ProbeKind = Literal["none", "agent_ping", "exec"]
ProbeFailureReaction = Literal["leave", "reset", "restart"]

#: Conservativeness order of modes: a more conservative mode always wins.
MODE_RANK: dict[str, int] = {"enforce": 0, "dry-run": 1, "observe": 2}


class ShutdownStep(BaseModel):
    """One step of the host-shutdown fallback chain: ``action`` bounded by ``timeout`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: ShutdownAction = Field(description="managedsave, shutdown (ACPI, wait for poweroff) or destroy")
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds before falling back to the next step")


def _parse_steps(value: Any) -> Any:
    """Accept ``"managedsave:120,shutdown:60"``, a list of such strings, or a list of tables."""
    if isinstance(value, str):
        value = [p for p in (s.strip() for s in value.split(",")) if p]
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, str):
                action, _, timeout = item.partition(":")
                step: dict[str, Any] = {"action": action.strip()}
                if timeout.strip():
                    step["timeout"] = timeout.strip()
                out.append(step)
            else:
                out.append(item)
        return tuple(out)
    return value


ShutdownSteps = Annotated[tuple[ShutdownStep, ...], BeforeValidator(_parse_steps)]

def _parse_argv(value: Any) -> Any:
    """Accept an argv list, or one string split like a shell would (``"/bin/test -f /tmp/ok"``,
    the form XML metadata gives)."""
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as err:
            raise ValueError(f"cannot split {value!r} into arguments: {err}") from None
    return value


def _parse_patterns(value: Any) -> Any:
    """Accept a list of regular expressions, or one string holding one per line (XML metadata)."""
    if isinstance(value, str):
        return tuple(line.strip() for line in value.splitlines() if line.strip())
    return value


def _compile_all(value: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in value:
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid regular expression {pattern!r}: {err}") from None
        if compiled.search(""):  # "" or "a|": every console line would be a panic
            raise ValueError(f"regular expression {pattern!r} matches an empty line, so every console line")
    return value


Argv = Annotated[tuple[str, ...], BeforeValidator(_parse_argv)]
Patterns = Annotated[tuple[str, ...], BeforeValidator(_parse_patterns), AfterValidator(_compile_all)]

#: Default ``console_failure_patterns``: what the Linux kernel prints on a panic, a BUG, an oops
#: and a soft lockup (regular expressions, searched in each console line).
DEFAULT_CONSOLE_FAILURE_PATTERNS = (
    r"Kernel panic - not syncing",
    r"\bBUG: ",
    r"\bOops: ",
    r"watchdog: BUG: soft lockup",
)

DEFAULT_SHUTDOWN_STEPS = (
    ShutdownStep(action="managedsave", timeout=300.0),
    ShutdownStep(action="shutdown", timeout=120.0),
    ShutdownStep(action="destroy", timeout=30.0),
)


class GuestPolicy(BaseModel):
    """Per-guest policy keys (``[policy.defaults]``, profiles, match rules, XML metadata).

    A complete, validated policy: every key has a default. Delays are seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    intent: IntentDefault = Field(
        "auto", description="intent of a guest first seen: 'auto' follows its current state, or 'running'/'stopped'"
    )
    on_crash: StopReaction = Field(
        "restart", description="guest kernel crash/panic (STOPPED_CRASHED, CRASHED_PANICKED)"
    )
    on_qemu_failure: StopReaction = Field("restart", description="QEMU process died (STOPPED_FAILED)")
    on_host_kill: StopReaction = Field(
        "restart", description="QEMU killed from the host (SHUTDOWN_HOST then STOPPED_SHUTDOWN, not by virtwatch)"
    )
    on_poweroff: StopReaction = Field(
        "leave", description="guest powered itself off (intent becomes stopped on 'leave')"
    )
    on_destroy: StopReaction = Field(
        "leave", description="admin destroy (STOPPED_DESTROYED; intent becomes stopped on 'leave')"
    )
    on_watchdog: StopReaction = Field(
        "restart", description="watchdog fired (pause or poweroff): restart, or leave + alert"
    )
    on_io_error: IoErrorReaction = Field(
        "leave",
        description="paused on an I/O error: leave (alert), resume after a delay, or kill (then restart by budget)",
    )
    io_error_resume_delay: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="seconds before resuming an I/O-error pause; grows by restart_backoff if it re-pauses",
    )
    on_restore_failure: RestoreFailure = Field(
        "keep",
        description="managed-save image cannot be restored: keep (alert), discard (remove image, cold boot), "
        "force-boot",
    )
    autostart: Autostart = Field(
        "was-running", description="boot flow: never, was-running (intent running / saved at shutdown), or always"
    )
    priority: int = Field(0, ge=-1000, le=1000, description="boot flow order: higher starts first, ties by name")
    restart_delay: float = Field(5.0, ge=0, le=86400, description="seconds before the first restart attempt")
    restart_backoff: float = Field(
        2.0, ge=1.0, le=100, description="factor applied to the delay per consecutive failure"
    )
    restart_max_delay: float = Field(300.0, ge=0, le=86400, description="cap on the restart delay, seconds")
    restart_jitter: float = Field(
        0.1, ge=0, le=1, description="random extra delay, as a fraction of the delay (0.1 = up to +10 %)"
    )
    limit_burst: int = Field(5, ge=1, le=1000, description="more failures than this within limit_interval -> given up")
    limit_interval: float = Field(600.0, gt=0, le=7 * 86400, description="window for limit_burst, seconds")
    stable_after: float = Field(
        300.0, ge=0, le=86400, description="running this long resets the backoff; a crash sooner is a failed start"
    )
    on_host_shutdown: ShutdownSteps = Field(
        DEFAULT_SHUTDOWN_STEPS,
        description="'virtwatch guests-save' fallbacks, e.g. ['managedsave:300', 'shutdown:120', 'destroy:30']",
    )
    capture_console: StrictBool = Field(
        False, description="keep a tail of the serial console (read by the console feature)"
    )
    console_buffer: int = Field(64, ge=1, le=65536, description="console tail size, KiB")

    # -- liveness (issue 12): failures libvirt reports no event for
    probe: ProbeKind = Field(
        "none", description="liveness probe through the guest agent: none, agent_ping (guest-ping) or exec "
        "(probe_command via guest-exec; exit status 0 passes)")
    probe_command: Argv = Field((), description="argv of the exec probe, e.g. ['/bin/test', '-f', '/tmp/healthy']")
    probe_interval: float = Field(30.0, ge=0.5, le=86400, description="seconds between two probes of one guest")
    probe_timeout: float = Field(
        5.0, gt=0, le=300, description="seconds a probe may take (our own deadline, on the agent's lane)")
    probe_failure_threshold: int = Field(
        3, ge=1, le=1000, description="consecutive failed probes that make a probe_failed failure")
    probe_initial_delay: float = Field(
        60.0, ge=0, le=86400, description="seconds after each start (or guest reboot) before the first probe "
        "and before the hang detector looks (a booting guest is busy and silent)")
    on_probe_failure: ProbeFailureReaction = Field(
        "leave", description="a liveness failure (probe_failed, console_panic, reboot_loop, hung): leave (alert), "
        "reset (virDomainReset) or restart (destroy + start), by the restart budget")
    console_failure_patterns: Patterns = Field(
        DEFAULT_CONSOLE_FAILURE_PATTERNS, description="regular expressions searched in each captured console "
        "line (capture_console must be on); a match is a console_panic failure")
    reboot_limit: int = Field(
        3, ge=1, le=1000, description="more guest reboots (REBOOT events) than this within reboot_interval "
        "is a reboot_loop failure")
    reboot_interval: float = Field(300.0, gt=0, le=7 * 86400, description="window for reboot_limit, seconds")
    hang_after: float = Field(
        0.0, ge=0, le=86400, description="busy but silent this long (vCPU time pegged, no block or network I/O) "
        "is a hung failure, seconds; 0 = off (a compute-only guest looks the same)")

    def captured_console_kib(self) -> int | None:
        """``console_buffer`` (KiB) when ``capture_console`` is set, else None."""
        return self.console_buffer if self.capture_console else None

    @field_validator("on_host_shutdown")
    @classmethod
    def _steps_nonempty(cls, v: tuple[ShutdownStep, ...]) -> tuple[ShutdownStep, ...]:
        if not v:
            raise ValueError("at least one step is needed")
        return v


#: Per-guest keys, in declaration order.
POLICY_KEYS: tuple[str, ...] = tuple(GuestPolicy.model_fields)


def _overlay_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, info in GuestPolicy.model_fields.items():
        ann = {"on_host_shutdown": ShutdownSteps, "probe_command": Argv,
               "console_failure_patterns": Patterns}.get(key, info.annotation)
        if info.metadata:  # keep the bounds (ge, gt, le...) the key has in [policy.defaults]
            ann = Annotated[(ann, *info.metadata)]
        fields[key] = (Optional[ann], Field(None, description=info.description))  # noqa: UP045 -- ann is a runtime value
    return fields


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Any subset of the per-guest keys (``None`` = not set by this layer).
PolicyOverlay = create_model(
    "PolicyOverlay",
    __base__=_Frozen,
    __doc__="A partial GuestPolicy: keys left None are not set by this layer.",
    **_overlay_fields(),
)


def overlay_values(overlay: BaseModel) -> dict[str, Any]:
    """The per-guest keys an overlay (profile, rule, metadata) sets, as ``{key: value}``."""
    return {k: getattr(overlay, k) for k in POLICY_KEYS if getattr(overlay, k) is not None}


class MatchRule(PolicyOverlay):  # type: ignore[misc,valid-type]
    """One ``[[policy.match]]`` rule: selectors (all given must match) + profile + mode + per-guest keys."""

    uuid: str | None = Field(None, description="exact guest UUID (case-insensitive)")
    name: str | None = Field(None, description="exact guest name")
    glob: str | None = Field(None, description="shell glob on the guest name, e.g. 'web*'")
    regex: str | None = Field(None, description="regular expression, must match the whole guest name")
    metadata: dict[str, str] | None = Field(
        None, description="labels from the guest's virtwatch XML metadata that must all be equal, e.g. {tier = 'web'}"
    )
    profile: str | None = Field(None, description="profile whose keys apply below this rule's own keys")
    mode: Mode | None = Field(
        None, description="mode for matched guests (the more conservative of this and [policy].mode wins)"
    )

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"invalid regular expression: {err}") from None
        return v

    @model_validator(mode="after")
    def _has_selector(self) -> MatchRule:
        if all(getattr(self, k) is None for k in ("uuid", "name", "glob", "regex", "metadata")):
            raise ValueError("a match rule needs at least one selector: uuid, name, glob, regex or metadata")
        return self

    def describe(self) -> str:
        """Short human form of the selectors, e.g. ``glob=web*``."""
        parts = [
            f"{k}={getattr(self, k)}"
            for k in ("uuid", "name", "glob", "regex", "metadata")
            if getattr(self, k) is not None
        ]
        return " ".join(parts)


class PolicySettings(BaseModel):
    """``[policy]``: whether and how virtwatch acts on guests.

    Engine-wide guards and boot-flow keys live here; per-guest keys live in
    ``defaults``, ``profile.NAME`` and ``match`` rules.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = Field(
        False, description="act on guests (needs a read-write libvirt connection); off = observe only"
    )
    mode: Mode = Field("enforce", description="enforce, dry-run (log what would be done) or observe (track state only)")
    defaults: GuestPolicy = Field(GuestPolicy(), description="per-guest keys for every managed guest")
    profile: dict[str, PolicyOverlay] = Field(default_factory=dict, description="named sets of per-guest keys")  # type: ignore[valid-type]
    match: tuple[MatchRule, ...] = Field((), description="rules selecting managed guests, in file order")

    max_parallel_starts: int = Field(2, ge=1, le=64, description="cold starts in flight at once")
    max_parallel_restores: int = Field(
        1, ge=1, le=64, description="managed-save restores in flight at once (I/O heavy)"
    )
    max_parallel_saves: int = Field(2, ge=1, le=64, description="host-shutdown saves/shutdowns in flight at once")
    max_actions_per_minute: int = Field(
        30, ge=1, le=10000, description="circuit breaker: actions beyond this per 60 s are deferred"
    )
    debounce: float = Field(0.5, ge=0, le=60, description="seconds a guest's event burst is coalesced before deciding")
    action_timeout: float = Field(60.0, gt=0, le=3600, description="deadline for one libvirt action, seconds")
    own_event_grace: float = Field(
        5.0, ge=0, le=300, description="events this long after our own action ends are still ours, seconds"
    )

    boot_settle_timeout: float = Field(
        120.0, ge=0, le=3600, description="boot flow: longest wait for libvirt's own autostart, seconds"
    )
    boot_settle_quiet: float = Field(
        5.0, ge=0, le=600, description="boot flow: no state change for this long = settled, seconds"
    )
    start_delay: float = Field(2.0, ge=0, le=3600, description="boot flow: seconds between launching two starts")

    journal_max_age: float = Field(
        30 * 86400.0,
        gt=0,
        le=10 * 365 * 86400,
        description="event journal: rows older than this are deleted, seconds (30 days)",
    )
    journal_max_events: int = Field(
        100_000, ge=1, le=100_000_000, description="event journal: only the newest this many rows are kept"
    )

    @field_validator("profile")
    @classmethod
    def _profile_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"profile name {name!r}: use letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _profiles_exist(self) -> PolicySettings:
        for i, rule in enumerate(self.match):
            if rule.profile is not None and rule.profile not in self.profile:
                raise ValueError(f"match[{i}].profile: unknown profile {rule.profile!r}")
        return self

    def effective_mode(self) -> Mode:
        """Engine-wide mode: ``observe`` when the policy is disabled, else ``mode``."""
        return "observe" if not self.enabled else self.mode

    def warnings(self) -> list[str]:
        """Valid but suspicious settings, one human-readable line each."""
        out: list[str] = []
        layers: list[tuple[str, dict[str, Any]]] = [("policy.defaults", self.defaults.model_dump())]
        for name, prof in self.profile.items():
            layers.append((f"policy.profile.{name}", {**self.defaults.model_dump(), **overlay_values(prof)}))
        for i, rule in enumerate(self.match):
            base = self.defaults.model_dump()
            if rule.profile:
                base.update(overlay_values(self.profile[rule.profile]))
            base.update(overlay_values(rule))
            layers.append((f"policy.match[{i}]", base))
        for where, v in layers:
            if v["limit_interval"] <= v["limit_burst"] * v["restart_delay"]:
                out.append(
                    f"{where}: limit_interval ({v['limit_interval']:g} s) <= limit_burst ({v['limit_burst']}) * "
                    f"restart_delay ({v['restart_delay']:g} s): failures spread by the backoff never reach the "
                    "burst limit, "
                    "so a crash-looping guest is never given up"
                )
            if v["probe"] == "exec" and not v["probe_command"]:
                out.append(f"{where}: probe = 'exec' without probe_command: the guest is not probed")
            if v["probe"] != "none" and v["probe_timeout"] >= v["probe_interval"]:
                out.append(f"{where}: probe_timeout ({v['probe_timeout']:g} s) >= probe_interval "
                           f"({v['probe_interval']:g} s): probes run back to back")
            if v["restart_max_delay"] < v["restart_delay"]:
                out.append(
                    f"{where}: restart_max_delay is below restart_delay; the delay is capped at restart_max_delay"
                )
        if self.match and not self.enabled:
            out.append("policy: match rules are configured but policy.enabled is false: guests are only observed")
        return out
