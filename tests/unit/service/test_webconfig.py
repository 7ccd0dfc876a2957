"""Web config file parsing (exporter-toolkit style YAML) and request limits."""

from __future__ import annotations

import inspect
from pathlib import Path

import bcrypt
import pydantic
import pytest
from aiohttp import web_protocol

from virtwatch.config import ConfigError
from virtwatch.web import HTTPLimits, WebConfig, WebConfigError, build_app_kwargs, build_site_kwargs, load_web_config

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "web.yml"
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(WebConfigError) as exc:
        load_web_config(write(tmp_path, text))
    assert isinstance(exc.value, ConfigError)
    return exc.value.errors


def test_full_file(tmp_path: Path) -> None:
    cfg = load_web_config(
        write(
            tmp_path,
            f"""
tls_server_config:
  cert_file: certs/server.crt
  key_file: /etc/ssl/private/server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  min_version: TLS13
http_server_config:
  http2: false
  headers:
    x-frame-options: deny
    Content-Security-Policy: default-src 'self'
basic_auth_users:
  alice: '{HASH}'
  bob: {HASH}
""",
        )
    )
    tls = cfg.tls_server_config
    assert tls is not None
    assert tls.cert_file == tmp_path / "certs/server.crt"  # relative to the file
    assert tls.key_file == Path("/etc/ssl/private/server.key")  # absolute stays
    assert tls.client_ca_file == tmp_path / "ca.crt"
    assert tls.client_auth_type == "RequireAndVerifyClientCert"
    assert tls.verifies_clients is True
    assert tls.min_version == "TLS13"
    assert cfg.http_server_config.headers == {
        "X-Frame-Options": "deny",  # canonical spelling
        "Content-Security-Policy": "default-src 'self'",
    }
    assert cfg.basic_auth_users == {"alice": HASH, "bob": HASH}


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n"])
def test_empty_file_means_plain_http_without_auth(tmp_path: Path, text: str) -> None:
    cfg = load_web_config(write(tmp_path, text))
    assert cfg == WebConfig()
    assert cfg.tls_server_config is None
    assert cfg.basic_auth_users == {}
    assert build_site_kwargs(cfg) == {"ssl_context": None}
    kw = build_app_kwargs(cfg)
    assert kw["middlewares"] == []


def test_no_file_is_the_default() -> None:
    assert load_web_config(None) == WebConfig()


def test_model_is_frozen(tmp_path: Path) -> None:
    cfg = load_web_config(None)
    with pytest.raises(pydantic.ValidationError):
        cfg.basic_auth_users = {}  # type: ignore[misc]


def test_every_error_reported_with_its_key_path(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        """
tls_server_config:
  cert_file: a.crt
  key_file: a.key
  min_version: TLS11
  cipher_suites: [TLS_AES_128_GCM_SHA256]
http_server_config:
  headers:
    Server: virtwatch
basic_auth_users:
  alice: plaintext
web_listen: ":1"
""",
    )
    assert errs == [
        "tls_server_config.min_version: TLS11 is not supported: virtwatch requires TLS12 or newer",
        "tls_server_config.cipher_suites: unknown or unsupported key",
        "http_server_config.headers: header 'Server' is not allowed; allowed: Strict-Transport-Security, "
        "X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy",
        "basic_auth_users: user 'alice': password must be a bcrypt hash ($2a$/$2b$/$2y$, 60 characters)",
        "web_listen: unknown or unsupported key",
    ]


@pytest.mark.parametrize(
    ("tls_extra", "message"),
    [
        ("  client_auth_type: RequestClientCert\n", "RequestClientCert is not supported"),
        ("  client_auth_type: RequireAnyClientCert\n", "RequireAnyClientCert is not supported"),
        ("  client_auth_type: VerifyClientCertIfGiven\n",
         "client_auth_type VerifyClientCertIfGiven needs client_ca_file"),
        ("  client_ca_file: ca.crt\n", "client_ca_file is set but client_auth_type is NoClientCert"),
        ("  min_version: TLS13\n  max_version: TLS12\n", "max_version TLS12 is below min_version TLS13"),
        ("  client_auth_type: Sometimes\n", "Input should be 'NoClientCert'"),
    ],
)
def test_tls_policy_errors(tmp_path: Path, tls_extra: str, message: str) -> None:
    errs = errors_of(tmp_path, "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n" + tls_extra)
    assert len(errs) == 1
    assert errs[0].startswith("tls_server_config")
    assert message in errs[0]


def test_tls_needs_cert_and_key(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "tls_server_config:\n  cert_file: a.crt\n")
    assert errs == ["tls_server_config.key_file: Field required"]


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Content-Type-Options", "sniff-away"), ("X-Frame-Options", "allow-from x")],
)
def test_header_values_checked(tmp_path: Path, header: str, value: str) -> None:
    errs = errors_of(tmp_path, f"http_server_config:\n  headers:\n    {header}: {value}\n")
    assert len(errs) == 1 and errs[0].startswith(f"http_server_config.headers: {header}:")


def test_user_names_with_colon_rejected(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, f"basic_auth_users:\n  'a:b': '{HASH}'\n")
    assert errs == ["basic_auth_users: user 'a:b': names must be non-empty and contain no ':'"]


def test_yaml_syntax_error(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "basic_auth_users: [unclosed\n")
    assert len(errs) == 1 and errs[0].startswith("YAML syntax:")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "- a\n- b\n") == ["(top level): expected a mapping"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as exc:
        load_web_config(tmp_path / "absent.yml")
    assert exc.value.errors == ["cannot read file: No such file or directory"]
    assert exc.value.source == str(tmp_path / "absent.yml")


def test_limits_use_names_this_aiohttp_accepts() -> None:
    limits = HTTPLimits(max_body_bytes=1000, max_line_size=2000, max_field_size=3000, max_headers=40,
                        keepalive_timeout=9)
    kw = limits.application_kwargs()
    assert kw["client_max_size"] == 1000
    accepted = inspect.signature(web_protocol.RequestHandler.__init__).parameters
    assert set(kw["handler_args"]) <= set(accepted)
    assert kw["handler_args"]["max_line_size"] == 2000
    assert kw["handler_args"]["max_field_size"] == 3000
    assert kw["handler_args"]["keepalive_timeout"] == 9
    if "max_headers" in accepted:
        assert kw["handler_args"]["max_headers"] == 40


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        HTTPLimits(max_body_bytes=0)
    with pytest.raises(ValueError):
        HTTPLimits(keepalive_timeout=-1)


def test_app_kwargs_with_auth_and_headers(tmp_path: Path) -> None:
    cfg = load_web_config(
        write(tmp_path, "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
                        f"basic_auth_users:\n  a: '{HASH}'\n")
    )
    sentinel = object()
    kw = build_app_kwargs(cfg, extra_middlewares=[sentinel])
    names = [getattr(m, "__name__", m) for m in kw["middlewares"]]
    assert names == ["add_headers", "basic_auth", sentinel]
    assert kw["client_max_size"] == HTTPLimits().max_body_bytes
