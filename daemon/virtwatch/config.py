"""Configuration: one TOML file validated by pydantic v2.

Every section is a frozen model that forbids unknown keys, so a typo is an
error naming its key path (``stats.poll_intervall: Extra inputs are not
permitted``) instead of a silently ignored setting. A missing file section
takes its defaults; no file at all is a valid configuration.

Errors: :func:`load_settings` raises :class:`ConfigError` carrying every
problem found (TOML syntax, unknown keys, bad values), each as
``"key.path: message"``.

TOML types are strict: a number written as a string (``poll_interval = "15"``)
or a boolean is an error naming the key, not quietly converted
(:func:`~virtwatch.infra.validation.strict_type_errors`). Relative paths in the
file (:data:`PATH_KEYS`) are taken from the file's directory, not from the
working directory (``/`` under systemd).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, field_validator, model_validator

from .agent.settings import AgentSettings
from .alerts.config import AlertSettings
from .console.settings import ConsoleSettings
from .infra.validation import format_validation_errors, strict_type_errors
from .policy.config import PolicySettings, overlay_values


class Section(BaseModel):
    """Base for config sections: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LibvirtSettings(Section):
    """``[libvirt]``: how to reach libvirtd and keep the connection alive."""

    uri: str = Field("qemu:///system", min_length=1, description="libvirt connection URI")
    read_only: Literal["auto", "yes", "no"] = Field(
        "auto", description="'auto': read-only unless policy actions need write access"
    )
    keepalive_interval: int = Field(5, ge=1, le=3600, description="seconds between keepalive probes")
    keepalive_count: int = Field(3, ge=0, le=100, description="unanswered probes before the connection is dead")
    reconnect_min_delay: float = Field(0.5, gt=0, le=3600, description="first reconnect delay, seconds")
    reconnect_max_delay: float = Field(30.0, gt=0, le=86400, description="reconnect delay cap, seconds")
    max_calls_in_flight: int = Field(
        1, ge=1, le=64,
        description="threads making calls on the main connection; keep 1: libvirt 9.0's client can crash "
                    "when a connection with calls from several threads closes (agent and policy have their own)")
    call_timeout: float = Field(30.0, gt=0, le=3600, description="deadline for one libvirt call, seconds")
    resync_interval: float = Field(300.0, ge=0,
                                   description="periodic full state resync, seconds (0 = only after connect)")


StatsGroup = Literal["state", "cpu", "balloon", "vcpu", "interface", "block", "perf", "iothread", "memory",
                    "dirtyrate", "vm"]


class StatsSettings(Section):
    """``[stats]``: the bulk statistics poll."""

    poll_interval: float = Field(15.0, ge=0.1, le=3600, description="seconds between polls")
    poll_timeout: float | None = Field(
        None, gt=0, le=3600, description="deadline for one poll, seconds (default: 80 % of poll_interval, at most 10)")
    groups: tuple[StatsGroup, ...] = Field(
        ("state", "cpu", "balloon", "vcpu", "interface", "block"), description="getAllDomainStats groups"
    )
    host: StrictBool = Field(True, description="also collect node, storage pool and network figures")
    group_intervals: dict[str, StrictFloat] | None = Field(
        None,
        description="seconds between reads of a group (or of the host figures, key 'host') that need not be read "
                    "every poll; a group not named here is read every poll, a read is rounded to whole polls, "
                    "and between reads the last figures are exported. Default: balloon, vcpu and host every "
                    "4 polls (60 s at the default poll_interval); {} reads everything every poll")
    max_stuck_lanes: int = Field(
        4, ge=1, le=16,
        description="most stats connections left behind calls stuck on a hung guest at once; each holds one "
                    "libvirtd worker (20 by default) until the guest answers")

    @property
    def effective_poll_timeout(self) -> float:
        """The poll deadline in seconds: ``poll_timeout`` or its default."""
        return self.poll_timeout if self.poll_timeout is not None else min(10.0, 0.8 * self.poll_interval)

    @property
    def effective_group_intervals(self) -> dict[str, float]:
        """Seconds between reads of each group read less often than every poll (see ``group_intervals``)."""
        if self.group_intervals is None:
            return {g: 4 * self.poll_interval for g in ("balloon", "vcpu", "host")}
        return dict(self.group_intervals)

    @field_validator("group_intervals")
    @classmethod
    def _positive_intervals(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        known = (*get_args(StatsGroup), "host")
        for group, seconds in (v or {}).items():
            if group not in known:
                raise ValueError(f"unknown group {group!r} (one of {', '.join(known)})")
            if not 0 < seconds <= 86400:
                raise ValueError(f"{group}: {seconds} is not in (0, 86400] seconds")
        return v

    @model_validator(mode="after")
    def _intervals_name_read_groups(self) -> StatsSettings:
        for group in self.group_intervals or {}:
            if group != "host" and group not in self.groups:
                raise ValueError(f"group_intervals names {group!r}, which is not in stats.groups")
        return self

    @field_validator("groups")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one stats group is needed")
        return tuple(dict.fromkeys(v))


class HTTPSettings(Section):
    """``[http]``: the metrics/HTTP endpoint."""

    listen: str = Field(":9177", description="HOST:PORT; ':9177' listens on every address")
    web_config_file: str | None = Field(
        None, description="Prometheus exporter-toolkit style web config (TLS, basic auth, headers); unset = plain HTTP")
    serve_console: StrictBool = Field(
        False, description="also serve captured console contents (/api/v1/guests/NAME/console); needs a web config "
                           "with authentication. Off: consoles are read over the operator socket only")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class MetricsSettings(Section):
    """``[metrics]``: bounds on what ``/metrics`` exposes (:mod:`~virtwatch.metrics.bounds`)."""

    max_series: int = Field(
        0, ge=0, le=100_000_000,
        description="series budget of /metrics; past it whole tiers of guest families are left out (per-vCPU, "
                    "then per-device detail, then per-device), never state or identity. 0 = no budget")


class LogSettings(Section):
    """``[log]``: structured logging."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    events: StrictBool = Field(True, description="log every libvirt event as one line")


class DaemonSettings(Section):
    """``[daemon]``: files the daemon owns."""

    state_dir: str = Field("/var/lib/virtwatch", description="SQLite state and journal live here")
    socket: str = Field("/run/virtwatch/virtwatch.sock", min_length=1, max_length=107,
                        description="operator Unix socket (AF_UNIX paths are at most 107 bytes)")
    shutdown_timeout: float = Field(20.0, gt=0, le=600, description="bound on orderly shutdown, seconds")
    boot_id_file: str = Field("/proc/sys/kernel/random/boot_id",
                              description="host boot id; the policy boot flow runs once per value")


DEMO_URI_PREFIX = "test:///"
"""The only URIs ``[demo]`` runs on: libvirt's in-process test driver (``test:///default``,
``test:///path/host.xml``), never a libvirtd (``test+unix://``, ``qemu://``...)."""


class DemoSettings(Section):
    """``[demo]``: a living demo on libvirt's in-process test driver.

    On a slow schedule it starts, pauses, resumes, shuts down and destroys the test
    driver's guests with the calls an operator would make, so that events, state
    reasons and the events list have something to show. It refuses any URI but a
    ``test:///`` one (:func:`cross_section_errors`).
    """

    enabled: StrictBool = Field(False, description="drive the test driver's guests (test:/// URIs only)")
    min_interval: float = Field(10.0, gt=0, le=3600, description="shortest pause between two actions, seconds")
    max_interval: float = Field(20.0, gt=0, le=3600, description="longest pause between two actions, seconds")
    guests: tuple[str, ...] = Field(("*",), description="fnmatch globs of the (persistent) guests it acts on")

    @model_validator(mode="after")
    def _interval_order(self) -> DemoSettings:
        if self.max_interval < self.min_interval:
            raise ValueError("max_interval must not be shorter than min_interval")
        return self


class Settings(Section):
    """The whole configuration (the TOML file's top level)."""

    libvirt: LibvirtSettings = LibvirtSettings()
    stats: StatsSettings = StatsSettings()
    http: HTTPSettings = HTTPSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    daemon: DaemonSettings = DaemonSettings()
    policy: PolicySettings = PolicySettings()
    alerts: AlertSettings = AlertSettings()
    console: ConsoleSettings = ConsoleSettings()
    agent: AgentSettings = AgentSettings()
    demo: DemoSettings = DemoSettings()


class ConfigError(Exception):
    """Invalid configuration. ``errors`` lists every problem as ``"path: message"``."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


def parse_listen(value: str) -> tuple[str | None, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` into (host or None, port).

    Raises ValueError for a missing or out-of-range port.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    return (host or None), int(port)


#: Keys that name files or directories: a relative value in a file is taken from the file's
#: directory (tests/unit/test_config.py checks every ``*_file``, ``*_dir`` and ``socket`` key is here).
PATH_KEYS = ("http.web_config_file", "daemon.state_dir", "daemon.socket", "daemon.boot_id_file",
             "alerts.basic_auth_password_file", "alerts.bearer_token_file", "alerts.tls_ca_file")


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with the relative :data:`PATH_KEYS` values made absolute from ``base``
    (other values, and values of the wrong type, unchanged)."""
    out = dict(data)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        table = out.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict) and isinstance(value, str) and value and not Path(value).is_absolute():
            out[section] = {**table, key: str(base / value)}
    return out


def settings_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate a parsed TOML mapping. Raises :class:`ConfigError` with every problem."""
    strict = strict_type_errors(Settings, dict(data))
    try:
        settings = Settings.model_validate(dict(data))
    except pydantic.ValidationError as err:
        flagged = {line.partition(": ")[0] for line in strict}
        raise ConfigError(source, strict + [line for line in format_validation_errors(err)
                                            if line.partition(": ")[0] not in flagged]) from None
    if strict:
        raise ConfigError(source, strict)
    problems = cross_section_errors(settings)
    if problems:
        raise ConfigError(source, problems)
    return settings


def cross_section_errors(settings: Settings) -> list[str]:
    """Problems between sections, as ``"key.path: message"`` lines (may be empty)."""
    out = []
    demo, lv = settings.demo, settings.libvirt
    if demo.enabled and not lv.uri.startswith(DEMO_URI_PREFIX):
        out.append(f"demo.enabled: the demo starts, pauses and destroys guests, so it runs only on libvirt's "
                   f"in-process test driver (a {DEMO_URI_PREFIX} URI such as test:///default), not on {lv.uri!r}")
    if demo.enabled and lv.read_only == "yes":
        out.append('demo.enabled: the demo acts on guests, which libvirt allows only on a read-write connection '
                   '(libvirt.read_only = "yes")')
    return out


DROPIN_DIR = "conf.d"
"""Drop-ins: ``conf.d/*.toml`` beside the configuration file (``/etc/virtwatch/conf.d/``)."""


def dropin_files(path: str | Path) -> list[Path]:
    """The drop-ins of the configuration file ``path``: ``*.toml`` in ``conf.d`` beside
    it, in file-name order (``10-site.toml`` before ``50-policy.toml``)."""
    folder = Path(path).parent / DROPIN_DIR
    try:
        return sorted((p for p in folder.glob("*.toml") if p.is_file()), key=lambda p: p.name)
    except OSError:
        return []


def merge_tables(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key, recursively; any other value
    (arrays, arrays of tables such as ``[[policy.match]]`` included) replaces the old one."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        out[key] = merge_tables(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _read_toml(path: str | Path) -> dict[str, Any]:
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(source, [f"cannot read file: {err.strerror or err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [f"TOML syntax: {err}"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(source, [f"not valid UTF-8 (TOML files are UTF-8): byte {err.start}"]) from None


def load_settings(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load ``path`` (None: defaults only) and its drop-ins, then apply dotted ``overrides``.

    The drop-ins (:func:`dropin_files`) are merged over the file in order
    (:func:`merge_tables`). Relative paths resolve from the directory of ``path``, in
    the drop-ins too (:func:`resolve_paths`). ``overrides`` maps ``"section.key"`` to a value
    (command-line flags); they win over the files. Raises :class:`ConfigError` for
    unreadable files, TOML syntax errors (naming the file) and every validation problem.
    """
    data: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        base = Path(path).resolve().parent
        data = resolve_paths(_read_toml(path), base)
        dropins = dropin_files(path)
        for dropin in dropins:
            data = merge_tables(data, resolve_paths(_read_toml(dropin), base))
        if dropins:
            source += " with " + ", ".join(f"{DROPIN_DIR}/{p.name}" for p in dropins)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return settings_from_mapping(data, source)


def config_warnings(settings: Settings) -> list[str]:
    """Valid but suspicious settings, as human-readable lines (may be empty)."""
    warnings = []
    if settings.stats.effective_poll_timeout > settings.stats.poll_interval:
        warnings.append("stats.poll_timeout is longer than stats.poll_interval: stuck polls delay the next")
    if settings.libvirt.reconnect_min_delay > settings.libvirt.reconnect_max_delay:
        warnings.append("libvirt.reconnect_min_delay exceeds libvirt.reconnect_max_delay")
    if settings.libvirt.max_calls_in_flight > 1:
        warnings.append("libvirt.max_calls_in_flight > 1: libvirt 9.0's client can crash (SIGSEGV) when a "
                        "connection used by several threads closes, e.g. at a libvirtd restart")
    warnings.extend(settings.policy.warnings())
    warnings.extend(settings.alerts.warnings())
    return warnings


def console_capture_configured(settings: Settings) -> bool:
    """Whether any guest can be selected for console capture: ``[console]``
    enabled and a ``guests`` glob, or ``capture_console = true`` in the policy's
    defaults, a profile or a rule (domain metadata can only be seen once running)."""
    if not settings.console.enabled:
        return False
    pol = settings.policy
    overlays = (*pol.profile.values(), *pol.match)  # their keys are made at run time: read them by name
    layers = [pol.defaults.capture_console, *(overlay_values(o).get("capture_console") for o in overlays)]
    return bool(settings.console.guests) or any(layers)


def wants_read_only(settings: Settings) -> bool:
    """Whether to open libvirt read-only: ``yes``/``no`` as configured;
    ``auto`` is read-only unless policy actions are enabled, console capture
    is configured (libvirt opens consoles on read-write connections only) or the
    demo drives the test driver's guests."""
    mode = settings.libvirt.read_only
    if mode == "auto":
        return not (settings.policy.enabled or console_capture_configured(settings) or settings.demo.enabled)
    return mode == "yes"


WRITE_ACCESS_GRANT = (
    "grant the virtwatch user read-write access to libvirt, then restart virtwatch "
    "(systemctl restart virtwatch): either enable the polkit rule the package ships, which allows "
    "org.libvirt.unix.manage to the virtwatch user only (cp /usr/share/virtwatch/polkit/50-virtwatch-libvirt.rules "
    "/etc/polkit-1/rules.d/), or add the user to the libvirt group (usermod -aG libvirt virtwatch). Either is "
    "root-equivalent on this host: libvirt can start any guest with any host file as its disk")
"""What to do when a feature needs libvirt write access (check-config and the daemon's log say it)."""


def write_access_features(settings: Settings) -> list[str]:
    """The configured features that need a read-write libvirt connection, in words
    (empty when the connection is read-only)."""
    if wants_read_only(settings):
        return []
    out = []
    if settings.policy.enabled:
        out.append("policy actions ([policy] enabled = true)")
    if console_capture_configured(settings):
        out.append("console capture ([console] with guests or capture_console)")
    if settings.agent.enabled:
        out.append("guest agent queries ([agent] enabled = true)")
    if not out:
        out.append('libvirt.read_only = "no"')
    return out


def write_access_note(settings: Settings) -> str | None:
    """What ``check-config`` says when the configuration needs libvirt write access
    (None when it does not, or on the in-process test driver, where nothing needs granting)."""
    needs = write_access_features(settings)
    if not needs or settings.libvirt.uri.startswith(DEMO_URI_PREFIX):
        return None
    return (f"read-write libvirt access is needed by {', '.join(needs)}: {WRITE_ACCESS_GRANT}. Without it "
            "virtwatch monitors on a read-only connection and logs each feature that cannot work.")


def write_denied_warnings(settings: Settings, refusal: str) -> list[dict[str, str]]:
    """One ``feature_unavailable`` log record's fields per configured feature that libvirt's
    ``refusal`` of write access stops: the feature, why, and what to grant."""
    why = f"libvirt refused read-write access: {refusal}; monitoring goes on read-only"
    return [{"feature": f, "reason": why, "what_to_do": WRITE_ACCESS_GRANT} for f in write_access_features(settings)]
