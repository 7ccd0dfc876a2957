"""``[alerts]`` configuration: where and how instant alerts reach Alertmanager."""

from __future__ import annotations

import re
import ssl
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

#: Where the runbooks (``docs/runbooks/<alertname>.md``) are published by default. The shipped
#: Prometheus rules use the same base (``make install-prometheus-rules RUNBOOK_BASE_URL=...``
#: rewrites it); ``[alerts] runbook_base_url`` changes it for the instant alerts.
DEFAULT_RUNBOOK_BASE_URL = "https://virtwatch.dev/docs/runbooks"


#: Labels the daemon sets on its alerts (``[alerts] labels`` may not).
RESERVED_LABELS = frozenset({"alertname", "severity", "instance", "domain", "uuid", "delivery"})


def default_instance(listen_host: str | None, port: int, hostname: str) -> str:
    """The ``instance`` label Prometheus gives this daemon with a default scrape config: ``HOST:PORT``.

    Args:
        listen_host: the host part of ``http.listen`` (None or ``""``: every address).
        port: the port actually bound (``http.listen`` may say 0).
        hostname: this host's name (``socket.gethostname()``).

    A wildcard listener (``:9177``, ``0.0.0.0``, ``[::]``) is scraped by the host's name, so that is
    the host; a specific address (``127.0.0.1``, ``10.0.0.5``, ``::1``) can only be scraped there, so
    it is that address (an IPv6 one in brackets, as Prometheus writes it).
    """
    host = (listen_host or "").strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        host = hostname
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


class AlertSettings(BaseModel):
    """``[alerts]``: instant event alerts posted to Alertmanager's v2 API.

    An empty ``alertmanager_urls`` disables instant alerts entirely (the shipped
    Prometheus rules still work from the metrics).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alertmanager_urls: tuple[str, ...] = Field(
        (),
        description="Alertmanager base URLs (http:// or https://), all posted to in parallel; empty = disabled",
    )
    timeout: float = Field(5.0, gt=0, le=300, description="deadline for one POST to one Alertmanager, seconds")
    queue_size: int = Field(
        1000, ge=1, le=1_000_000,
        description="pending alerts per Alertmanager; past it the oldest are dropped (counted)",
    )
    retry_min_delay: float = Field(0.5, gt=0, le=3600, description="first retry delay after a failed POST, seconds")
    retry_max_delay: float = Field(30.0, gt=0, le=86400, description="cap of the exponential retry delay, seconds")
    resend_interval: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="re-post firing alerts this often; each post sets endsAt = now + 4 x this, so an alert"
        " of a dead daemon resolves by itself (keep it well below Alertmanager's resolve_timeout)",
    )
    min_firing_duration: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="a resolved alert stays active in Alertmanager until at least startsAt + this, seconds;"
        " keep it above Alertmanager's group_wait or a crash healed in seconds is never notified",
    )
    basic_auth_username: str | None = Field(None, description="HTTP basic auth user for Alertmanager")
    basic_auth_password_file: str | None = Field(
        None, description="file holding the basic auth password (read at start, trailing newline stripped)"
    )
    bearer_token_file: str | None = Field(None, description="file holding a bearer token (read at start)")
    tls_ca_file: str | None = Field(None, description="PEM CA bundle to verify https:// Alertmanagers")
    tls_insecure_skip_verify: StrictBool = Field(False, description="do not verify the Alertmanager's TLS certificate")
    instance: str | None = Field(
        None,
        description="value of the 'instance' label of every alert; default: the instance a default Prometheus"
        " scrape config gives this daemon, HOSTNAME:PORT of the metrics listener (the listen address instead of"
        " the host name when it is a specific one, e.g. 127.0.0.1:9177), so that the rule alerts from its"
        " metrics and the instant alerts carry the same identity and Alertmanager merges them",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="further labels on every instant alert, e.g. the external_labels of your Prometheus (site,"
        " cluster; not its replica label) so that the rule alerts and the instant alerts carry the same labels",
    )
    late_resolved_hold: float = Field(
        330.0,
        ge=0,
        le=86400,
        description="an alert that fired and cleared before an Alertmanager accepted it (an outage, a restart) is"
        " still delivered, with its original startsAt and endsAt = delivery time + this, seconds, so that it is"
        " notified once; keep it above Alertmanager's group_wait + group_interval (+ peer_timeout per extra"
        " cluster member); the default fits group_interval 5m",
    )
    external_url: str | None = Field(
        None,
        description="this daemon's base URL as operators reach it, e.g. http://hv01:9177; alerts link to it"
        " (generatorURL): guest alerts to /api/v1/guests/NAME, host alerts to the landing page; no link if unset",
    )
    generator_url: str | None = Field(
        None,
        description="deprecated, use external_url: one fixed generatorURL for every alert; only allowed"
        " without external_url",
    )
    runbook_base_url: str = Field(
        DEFAULT_RUNBOOK_BASE_URL,
        description="every alert gets the annotation runbook_url = this + '/' + alertname + '.md' (the runbooks"
        " are docs/runbooks/*.md); empty = no runbook_url",
    )

    rule_window: float = Field(
        900.0,
        ge=0,
        le=86400,
        description="how long the shipped rules keep VirtwatchGuestCrashed and VirtwatchQemuFailed (the rule twins"
        " of the instant alerts) firing after the guest runs again, seconds (their [15m] window); a late delivery"
        " after that gets the label delivery=\"late\", so that Prometheus' resolved twin, which it re-sends for 15"
        " minutes, does not end it before it is notified; 0 = the shipped rules are not in use, so a resolve"
        " of these alerts ends them at once (else a resolve never ends the alert Alertmanager merged with"
        " its rule twin: the rule does)",
    )

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("instance must not be empty (leave it out for the default)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) or name.startswith("__"):
                raise ValueError(f"{name!r} is not a Prometheus label name")
            if name in RESERVED_LABELS:
                raise ValueError(f"label {name!r} is set by virtwatch itself (use alerts.instance for 'instance')")
            if not value:
                raise ValueError(f"label {name!r} has an empty value")
        return v

    @field_validator("alertmanager_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            _http_url(url)
        return tuple(dict.fromkeys(v))

    @field_validator("external_url", "runbook_base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if not v:
            return v
        return _http_url(v).rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> AlertSettings:
        if self.retry_min_delay > self.retry_max_delay:
            raise ValueError("retry_min_delay exceeds retry_max_delay")
        if (self.basic_auth_username is None) != (self.basic_auth_password_file is None):
            raise ValueError("basic_auth_username and basic_auth_password_file go together")
        if self.basic_auth_username is not None and self.bearer_token_file is not None:
            raise ValueError("use either basic auth or a bearer token, not both")
        if self.external_url is not None and self.generator_url is not None:
            raise ValueError("generator_url is deprecated and replaced by external_url: set only external_url")
        return self

    @property
    def enabled(self) -> bool:
        """True when at least one Alertmanager URL is configured."""
        return bool(self.alertmanager_urls)

    def runbook_url(self, alertname: str) -> str | None:
        """The ``runbook_url`` annotation of ``alertname``; None when ``runbook_base_url`` is empty."""
        if not self.runbook_base_url:
            return None
        return f"{self.runbook_base_url}/{quote(alertname, safe='')}.md"

    def link(self, domain: str = "") -> str | None:
        """The ``generatorURL`` of an alert about guest ``domain`` (``""``: a host alert).

        With ``external_url``: the guest's page ``/api/v1/guests/NAME`` (the name percent-encoded,
        ``/`` included), or the landing page ``/`` for host alerts. Else the deprecated fixed
        ``generator_url``, else None.
        """
        if self.external_url is None:
            return self.generator_url
        if not domain:
            return self.external_url + "/"
        return f"{self.external_url}/api/v1/guests/{quote(domain, safe='')}"

    def file_problems(self) -> list[str]:
        """The configured credential and CA files the daemon could not use at start, as
        ``"alerts.key: message"`` lines (may be empty): unreadable, not UTF-8, empty, more than
        one line (a secret), or a CA bundle ``ssl`` cannot load. Reads the files."""
        out = []
        for key in ("basic_auth_password_file", "bearer_token_file"):
            path = getattr(self, key)
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as fh:
                    secret = fh.read().strip()
            except OSError as err:
                out.append(f"alerts.{key}: cannot read {path}: {err.strerror or err}")
                continue
            except UnicodeDecodeError:
                out.append(f"alerts.{key}: {path} is not UTF-8 text")
                continue
            if not secret:
                out.append(f"alerts.{key}: {path} is empty")
            elif not secret.isprintable():
                out.append(f"alerts.{key}: {path} must hold one line (the secret) without control characters")
        if self.tls_ca_file and not self.tls_insecure_skip_verify:
            try:
                ssl.create_default_context(cafile=self.tls_ca_file)
            except OSError as err:  # ssl.SSLError included
                out.append(f"alerts.tls_ca_file: cannot load {self.tls_ca_file}: {err.strerror or err}")
        return out

    def warnings(self) -> list[str]:
        """Valid but deprecated or suspicious settings, as human-readable lines."""
        if self.generator_url is not None:
            return ["alerts.generator_url is deprecated: set alerts.external_url (the daemon's base URL, e.g. "
                    "http://hv01:9177) so that guest alerts link to the guest's page"]
        return []
