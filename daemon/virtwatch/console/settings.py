"""``[console]`` settings: which guests are captured and how (units in each field's description)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

#: Default ``alert_redact``: a secret-looking word (password, passwd, passphrase, secret, token,
#: api_key, auth, authorization, bearer, with anything glued to it: ``DB_PASSWORD``), then
#: ``:``/``=``/blanks, then the value (a ``Bearer``/``Basic`` scheme word included).
DEFAULT_ALERT_REDACT = (r"(?i)\b\w*(pass(word|wd|phrase)?|secret|token|api[_-]?key|auth(orization)?|bearer)\w*"
                        r"(\s*[:=]\s*|\s+)((bearer|basic)\s+)?\S+")


class ConsoleSettings(BaseModel):
    """``[console]``: console capture, opt-in per guest.

    A guest is captured when ``enabled`` (the feature's switch, on by default)
    and its merged policy says ``capture_console = true`` (a ``[[policy.match]]``
    rule, profile, ``[policy.defaults]``, domain metadata) or its name matches
    one of the ``guests`` glob patterns (``fnmatch``, case-sensitive). Nothing
    is captured by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = Field(
        True, description="the console feature's switch: false captures nothing, whatever policy says")
    guests: tuple[str, ...] = Field((), description="glob patterns of guest names to capture")
    device: str | None = Field(None, description="console device alias for openConsole (default: the first console)")
    buffer_kib: int = Field(64, ge=1, le=65536, description="ring buffer per guest, KiB")
    poll_interval: float = Field(0.05, gt=0, le=10, description="poll interval while data flows, seconds")
    idle_poll_interval: float = Field(0.5, gt=0, le=60, description="poll interval cap while idle, seconds")
    max_read_per_tick: int = Field(256 * 1024, ge=4096, le=64 * 1024 * 1024,
                                   description="bytes read per guest per tick at most (bounds CPU)")
    reattach_min_delay: float = Field(0.5, gt=0, le=3600, description="first re-attach delay, seconds")
    reattach_max_delay: float = Field(30.0, gt=0, le=86400, description="re-attach delay cap, seconds")
    force: StrictBool = Field(False,
                              description="take the console even when someone else holds it (VIR_DOMAIN_CONSOLE_FORCE)")
    crash_lines: int = Field(200, ge=1, le=100000, description="lines persisted with a crash")
    alert_lines: int = Field(20, ge=1, le=10000, description="lines attached to an alert annotation")
    alert_console: StrictBool = Field(
        False, description="attach the last alert_lines console lines to instant alerts (annotation 'console'), "
                           "after alert_redact; off: alerts carry no console text")
    alert_redact: str = Field(
        DEFAULT_ALERT_REDACT, description="regular expression; each match in the alert's console lines becomes "
                                          "'[redacted]' ('' = no redaction)")
    read_log_file: StrictBool = Field(True, description="after a crash also read the serial's virtlogd <log file=...>")
    log_file_max_bytes: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024,
                                    description="bytes read from the end of the log file at most")
    screenshot: StrictBool = Field(True, description="take a screenshot on a crash when the guest has graphics")
    settle: float = Field(0.5, ge=0, le=30, description="wait after a crash event for the last output, seconds")
    coalesce_seconds: float = Field(10.0, ge=0, le=3600,
                                    description="crash events of one guest this close together make one record")
    keep_crashes: int = Field(1000, ge=1, le=10**7, description="crash records kept in console.sqlite")

    @field_validator("alert_redact")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"invalid regular expression: {err}") from None
        return v

    def redact(self, lines: list[str]) -> list[str]:
        """``lines`` with every ``alert_redact`` match replaced by ``[redacted]``."""
        if not self.alert_redact:
            return list(lines)
        pattern = re.compile(self.alert_redact)
        return [pattern.sub("[redacted]", line) for line in lines]
