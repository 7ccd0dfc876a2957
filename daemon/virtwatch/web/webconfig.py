"""The HTTP endpoint's web config file, in the style of Prometheus' exporter-toolkit.

Same YAML shape as ``--web.config.file`` of the Prometheus exporters, so
operators can reuse what they already have::

    tls_server_config:
      cert_file: server.crt          # relative paths: relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: clients-ca.crt
      min_version: TLS12             # TLS12 (default) or TLS13
      max_version: TLS13
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000
        X-Content-Type-Options: nosniff
    basic_auth_users:
      prometheus: $2b$12$....        # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

Differences from exporter-toolkit, each rejected with a clear message rather
than silently ignored: ``min_version`` below TLS12; ``client_auth_type``
``RequestClientCert``/``RequireAnyClientCert`` (Python's ``ssl`` always
verifies a presented client certificate); ``cipher_suites``,
``curve_preferences``, ``client_allowed_sans``, inline ``cert``/``key``.
``http2`` is accepted and ignored (aiohttp serves HTTP/1.1).

Errors: :func:`load_web_config` raises :class:`WebConfigError` (a
:class:`virtwatch.config.ConfigError`) listing every problem as
``"key.path: message"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ..config import ConfigError
from ..infra.validation import format_validation_errors

__all__ = [
    "HTTPServerConfig",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "load_web_config",
    "web_config_from_mapping",
]

# Headers exporter-toolkit lets a web config set (its allowlist).
ALLOWED_HEADERS = (
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
)

_BCRYPT_RE = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")

ClientAuthType = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]


class WebConfigError(ConfigError):
    """Invalid web config file. ``errors`` lists every problem as ``"path: message"``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Section):
    """``tls_server_config``: serve HTTPS. Paths are absolute after loading."""

    cert_file: Path = Field(description="PEM server certificate (chain)")
    key_file: Path = Field(description="PEM private key for cert_file")
    client_auth_type: ClientAuthType = Field("NoClientCert", description="client certificate policy")
    client_ca_file: Path | None = Field(None, description="PEM CA bundle that signs client certificates")
    min_version: TLSVersion = Field("TLS12", description="lowest TLS version accepted (TLS12 or TLS13)")
    max_version: TLSVersion | None = Field(None, description="highest TLS version (default: the library's)")
    prefer_server_cipher_suites: StrictBool = Field(True, description="accepted for compatibility; always on")

    @field_validator("min_version", "max_version")
    @classmethod
    def _at_least_tls12(cls, v: str | None) -> str | None:
        if v in ("TLS10", "TLS11"):
            raise ValueError(f"{v} is not supported: virtwatch requires TLS12 or newer")
        return v

    @field_validator("client_auth_type")
    @classmethod
    def _verifying_only(cls, v: str) -> str:
        if v in ("RequestClientCert", "RequireAnyClientCert"):
            raise ValueError(
                f"{v} is not supported (client certificates are always verified); "
                "use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TLSServerConfig:
        verifies = self.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
        if verifies and self.client_ca_file is None:
            raise ValueError(f"client_auth_type {self.client_auth_type} needs client_ca_file")
        if not verifies and self.client_ca_file is not None:
            raise ValueError("client_ca_file is set but client_auth_type is NoClientCert")
        order = {"TLS12": 2, "TLS13": 3}
        if self.max_version and order[self.max_version] < order[self.min_version]:
            raise ValueError(f"max_version {self.max_version} is below min_version {self.min_version}")
        return self

    @property
    def verifies_clients(self) -> bool:
        """True when client certificates are checked against ``client_ca_file``."""
        return self.client_auth_type != "NoClientCert"


class HTTPServerConfig(_Section):
    """``http_server_config``: extra response headers (exporter-toolkit allowlist)."""

    headers: dict[str, str] = Field(default_factory=dict, description="header name -> value, added to every response")
    http2: StrictBool = Field(True, description="accepted for compatibility; aiohttp serves HTTP/1.1")

    @field_validator("headers")
    @classmethod
    def _allowed(cls, v: dict[str, str]) -> dict[str, str]:
        canon = {h.lower(): h for h in ALLOWED_HEADERS}
        out: dict[str, str] = {}
        for name, value in v.items():
            key = canon.get(name.lower())
            if key is None:
                raise ValueError(f"header {name!r} is not allowed; allowed: {', '.join(ALLOWED_HEADERS)}")
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise ValueError(f"header {name!r}: value must be a single-line string")
            if key == "X-Content-Type-Options" and value.lower() != "nosniff":
                raise ValueError("X-Content-Type-Options: only 'nosniff' is valid")
            if key == "X-Frame-Options" and value.lower() not in ("deny", "sameorigin"):
                raise ValueError("X-Frame-Options: must be 'deny' or 'sameorigin'")
            out[key] = value
        return out


class WebConfig(_Section):
    """The whole web config file. An empty file (or none) means plain HTTP, no auth."""

    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = HTTPServerConfig()
    basic_auth_users: dict[str, str] = Field(default_factory=dict, description="user -> bcrypt hash")

    @field_validator("basic_auth_users")
    @classmethod
    def _bcrypt_hashes(cls, v: dict[str, str]) -> dict[str, str]:
        for user, hashed in v.items():
            if not user or ":" in user:
                raise ValueError(f"user {user!r}: names must be non-empty and contain no ':'")
            if not isinstance(hashed, str) or not _BCRYPT_RE.match(hashed):
                raise ValueError(f"user {user!r}: password must be a bcrypt hash ($2a$/$2b$/$2y$, 60 characters)")
        return v


def _resolve(data: Any, base: Path) -> Any:
    """Make ``tls_server_config`` file paths absolute relative to ``base``."""
    if not isinstance(data, dict):
        return data
    tls = data.get("tls_server_config")
    if isinstance(tls, dict):
        tls = dict(tls)
        for key in ("cert_file", "key_file", "client_ca_file"):
            value = tls.get(key)
            if isinstance(value, str) and value:
                tls[key] = str(base / value)  # an absolute value wins over base
        data = {**data, "tls_server_config": tls}
    return data


def web_config_from_mapping(data: Mapping[str, Any] | None, source: str = "<web config>",
                            base_dir: Path | None = None) -> WebConfig:
    """Validate parsed YAML. Relative TLS paths resolve against ``base_dir``.

    Raises :class:`WebConfigError` with every problem.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise WebConfigError(source, ["(top level): expected a mapping"])
    resolved = _resolve(dict(data), base_dir) if base_dir is not None else dict(data)
    try:
        return WebConfig.model_validate(resolved)
    except pydantic.ValidationError as err:
        raise WebConfigError(source, format_validation_errors(err, unknown_key="unknown or unsupported key")) from None


def load_web_config(path: str | Path | None) -> WebConfig:
    """Read and validate the web config file at ``path`` (None: the default).

    Relative TLS file paths are taken relative to the file's directory, as in
    exporter-toolkit. The TLS files themselves are read later, by
    :func:`virtwatch.web.tls.build_ssl_context`. Raises
    :class:`WebConfigError` for an unreadable file, YAML syntax errors and
    every validation problem.
    """
    if path is None:
        return WebConfig()
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise WebConfigError(source, [f"cannot read file: {err.strerror or err}"]) from None
    except UnicodeDecodeError as err:
        raise WebConfigError(source, [f"not UTF-8: {err}"]) from None
    import yaml  # only with a web config: keeps pyyaml out of a daemon that has none (issue 16)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise WebConfigError(source, [f"YAML syntax: {err}"]) from None
    return web_config_from_mapping(data, source, base_dir=path.resolve().parent)
