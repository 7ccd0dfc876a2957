"""The HTTP listener's web config on a real daemon (issue 13, items 4 to 6).

- A SIGHUP that changes only the web config or its files (a renewed certificate, a new
  user) swaps the TLS context and the users in place: the daemon object, its libvirt
  connection, counters and firing alerts stay; the listening socket is never closed.
- ``virtwatch check-config`` fails on what the service would fail on.
- Console contents are not served over HTTP unless ``http.serve_console`` opts in, and
  that needs authentication.

The daemon runs in this process on the test driver, with a throwaway PKI (conftest).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from virtwatch.app import Daemon, reload, web_only_change
from virtwatch.cli.check_config import check_config
from virtwatch.config import ConfigError, Settings, load_settings, settings_from_mapping
from virtwatch.control import request
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl

PKI = Any


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bhash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def renew(pki: PKI, d: Path) -> None:
    """A new server certificate (new key, same CA) at d/server.crt and d/server.key."""
    (d / "renew.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                 "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "server.key", "-out", "renew.csr", "-subj", "/CN=renewed"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", "renew.csr", "-CA", str(pki.ca_crt), "-CAkey",
                    str(pki.dir / "ca.key"), "-CAcreateserial", "-out", "server.crt", "-days", "2",
                    "-extfile", "renew.ext"], cwd=d, check=True, capture_output=True, timeout=60)


def write_web(d: Path, users: dict[str, str], tls: bool = True) -> None:
    lines = ["tls_server_config:", "  cert_file: server.crt", "  key_file: server.key"] if tls else []
    lines += ["basic_auth_users:"] + [f"  {u}: '{h}'" for u, h in users.items()]
    (d / "web.yml").write_text("\n".join(lines) + "\n")


def settings(tmp_path: Path, **http: Any) -> Settings:
    return settings_from_mapping({
        "libvirt": {"uri": "test:///default"},
        "http": {"listen": "127.0.0.1:0", "web_config_file": str(tmp_path / "web.yml"), **http},
        "stats": {"poll_interval": 0.5},
        "log": {"events": False},
        "console": {"guests": ["*"]},
        "daemon": {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "vw.sock")},
    })


def peer_cert(port: int, ca: Path) -> bytes:
    """The DER certificate the listener presents now (a fresh TLS handshake)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def get(port: int, path: str, ca: Path | None, auth: str | None = None) -> int:
    """Status of one GET (a fresh connection each time)."""
    import urllib.error
    import urllib.request

    scheme = "https" if ca else "http"
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", headers={"Authorization": auth} if auth else {})
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


async def test_web_config_reload_swaps_tls_and_users_in_place(event_impl: ThreadSafeAsyncIOImpl, pki: PKI,
                                                              tmp_path: Path) -> None:
    for name in ("server.crt", "server.key"):
        shutil.copy(getattr(pki, name.replace(".", "_")), tmp_path / name)
    write_web(tmp_path, {"alice": bhash("a-pass")})
    d = Daemon(settings(tmp_path), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        port = d.listen_address[1]
        conn, listener = d.connection.conn, d.web._listeners[0].fileno()
        d.alerter.given_up("g1", "uuid-g1", "test")  # a firing instant alert
        old_der = await asyncio.to_thread(peer_cert, port, pki.ca_crt)
        assert old_der == ssl.PEM_cert_to_DER_cert(pki.server_crt.read_text())
        assert await asyncio.to_thread(get, port, "/metrics", pki.ca_crt, basic("alice", "a-pass")) == 200
        d.instruments.events.labels(kind="k", event="e", detail="d").inc(5)

        # Renew the certificate and replace the users; the TOML file is unchanged.
        await asyncio.to_thread(renew, pki, tmp_path)
        write_web(tmp_path, {"bob": bhash("b-pass")})
        same = await reload(d, settings(tmp_path))

        assert same is d  # nothing rebuilt
        assert d.connection.conn is conn and d.web._listeners[0].fileno() == listener and d.listen_address[1] == port
        assert ("VirtwatchGivenUp", "g1") in d.alerter.active
        assert d.instruments.events.labels(kind="k", event="e", detail="d")._value.get() == 5
        new_der = await asyncio.to_thread(peer_cert, port, pki.ca_crt)
        assert new_der != old_der and new_der == ssl.PEM_cert_to_DER_cert((tmp_path / "server.crt").read_text())
        assert await asyncio.to_thread(get, port, "/metrics", pki.ca_crt, basic("alice", "a-pass")) == 401
        assert await asyncio.to_thread(get, port, "/metrics", pki.ca_crt, basic("bob", "b-pass")) == 200
        assert await asyncio.to_thread(get, port, "/healthz", pki.ca_crt) == 200

        # A web config that cannot be used keeps the running one (and the daemon).
        (tmp_path / "server.key").unlink()
        kept = await reload(d, settings(tmp_path))
        assert kept is d and await asyncio.to_thread(peer_cert, port, pki.ca_crt) == new_der
        assert await asyncio.to_thread(get, port, "/metrics", pki.ca_crt, basic("bob", "b-pass")) == 200

        # TLS off is a web config change too: plain HTTP on the same socket.
        write_web(tmp_path, {"bob": bhash("b-pass")}, tls=False)
        assert await reload(d, settings(tmp_path)) is d
        assert await asyncio.to_thread(get, port, "/metrics", None, basic("bob", "b-pass")) == 200
    finally:
        await d.stop()


async def test_certificate_renewals_never_refuse_a_connection(event_impl: ThreadSafeAsyncIOImpl, pki: PKI,
                                                          tmp_path: Path) -> None:
    for name in ("server.crt", "server.key"):
        shutil.copy(getattr(pki, name.replace(".", "_")), tmp_path / name)
    write_web(tmp_path, {"alice": bhash("a-pass")})
    d = Daemon(settings(tmp_path), event_impl)
    await d.start()
    try:
        port = d.listen_address[1]
        stop = False
        results: list[int | str] = []

        def hammer() -> None:
            while not stop:
                try:
                    results.append(get(port, "/healthz", pki.ca_crt))
                except OSError as err:
                    results.append(repr(err))

        client = asyncio.get_running_loop().run_in_executor(None, hammer)
        for _ in range(20):
            await reload(d, settings(tmp_path))
            await asyncio.sleep(0.01)
        stop = True
        await client
        assert len(results) >= 10 and set(results) == {200}, [r for r in results if r != 200][:3]
    finally:
        await d.stop()


def test_web_only_change_is_the_web_config_file_alone(tmp_path: Path) -> None:
    base = settings(tmp_path)
    assert web_only_change(base, settings(tmp_path))
    assert web_only_change(base, settings(tmp_path, web_config_file=str(tmp_path / "other.yml")))
    assert not web_only_change(base, settings(tmp_path, listen="127.0.0.1:1"))
    assert not web_only_change(base, settings(tmp_path, serve_console=True))
    other = base.model_copy(update={"stats": base.stats.model_copy(update={"poll_interval": 2.0})})
    assert not web_only_change(base, other)


async def test_console_is_not_served_over_http_by_default(event_impl: ThreadSafeAsyncIOImpl,
                                                          tmp_path: Path, make_guests: Any) -> None:
    assert Settings().http.serve_console is False
    write_web(tmp_path, {"alice": bhash("a-pass")}, tls=False)
    d = Daemon(settings(tmp_path), event_impl)  # console capture of every guest, authenticated HTTP
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "cx", 1)
        name = dom.name()
        sock = d.settings.daemon.socket
        for _ in range(100):
            status, body = await asyncio.to_thread(request, sock, "GET", f"/v1/guests/{name}/console")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and body["name"] == name and body["lines"] == []  # the operator socket serves it
        port = d.listen_address[1]
        auth = basic("alice", "a-pass")
        assert await asyncio.to_thread(get, port, f"/api/v1/guests/{name}/console", None, auth) == 404
        assert await asyncio.to_thread(get, port, f"/api/v1/guests/{name}", None, auth) == 200
    finally:
        await d.stop()


async def test_console_over_http_needs_authentication(event_impl: ThreadSafeAsyncIOImpl, pki: PKI,
                                                      tmp_path: Path, make_guests: Any) -> None:
    (tmp_path / "web.yml").write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    refused = Daemon(settings(tmp_path, serve_console=True), event_impl)
    with pytest.raises(ConfigError) as err:
        await refused.start()
    await refused.stop()
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith(
        "http.serve_console: console contents (what was typed or printed on a guest's console) are served over "
        "HTTP only with authentication")

    write_web(tmp_path, {"alice": bhash("a-pass")}, tls=False)
    d = Daemon(settings(tmp_path, serve_console=True), event_impl)
    await d.start()
    try:
        await d.connection.ready.wait()
        (dom,) = await asyncio.to_thread(make_guests, "cy", 1)
        port, path = d.listen_address[1], f"/api/v1/guests/{dom.name()}/console"
        for _ in range(100):
            if d.console.state(dom.name()) is not None:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(get, port, path, None) == 401
        assert await asyncio.to_thread(get, port, path, None, basic("alice", "a-pass")) == 200
        # A reload to a web config without users is refused; the running one stays.
        (tmp_path / "web.yml").write_text("{}\n")
        assert await reload(d, settings(tmp_path, serve_console=True)) is d
        assert await asyncio.to_thread(get, port, path, None) == 401
    finally:
        await d.stop()


def check(path: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = check_config(str(path))
    return rc, err.getvalue()


def test_check_config_fails_on_what_the_service_would_fail_on(pki: PKI, tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "web.yml").write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n")
    (conf / "empty-token").write_text("\n")
    (conf / "virtwatch.toml").write_text(
        '[http]\nweb_config_file = "web.yml"\nserve_console = true\n'
        '[alerts]\nalertmanager_urls = ["http://127.0.0.1:9093"]\nbearer_token_file = "empty-token"\n'
        'tls_ca_file = "nope.pem"\n')
    rc, err = check(conf / "virtwatch.toml")
    assert rc == 2
    web = f"http.web_config_file ({conf}/web.yml)"  # relative: from the config file's directory
    assert err.splitlines()[1:] == [
        f"  alerts.bearer_token_file: {conf}/empty-token is empty",
        f"  alerts.tls_ca_file: cannot load {conf}/nope.pem: No such file or directory",
        "  http.serve_console: console contents (what was typed or printed on a guest's console) are served over "
        "HTTP only with authentication: set basic_auth_users, or tls_server_config with client_auth_type "
        "RequireAndVerifyClientCert, in http.web_config_file; or leave serve_console off and read consoles "
        "with `virtwatch console-log` over the operator socket",
    ]

    # With users, the next problem shows: the TLS files themselves.
    (conf / "web.yml").write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n"
                                  f"basic_auth_users:\n  alice: '{bhash('x')}'\n")
    (conf / "virtwatch.toml").write_text('[http]\nweb_config_file = "web.yml"\nserve_console = true\n')
    rc, err = check(conf / "virtwatch.toml")
    assert rc == 2 and err.splitlines()[1:] == [
        f"  {web}: tls_server_config.cert_file: cannot read {conf}/missing.crt: No such file or directory",
        f"  {web}: tls_server_config.key_file: cannot read {conf}/missing.key: No such file or directory",
    ]
    # A key that does not belong to the certificate.
    shutil.copy(pki.server_crt, conf / "missing.crt")
    shutil.copy(pki.client_key, conf / "missing.key")
    rc, err = check(conf / "virtwatch.toml")
    assert rc == 2 and f"{web}: tls_server_config.cert_file/key_file: cannot load" in err
    shutil.copy(pki.server_key, conf / "missing.key")
    assert check(conf / "virtwatch.toml") == (0, "")


def test_check_config_runs_from_another_directory_and_strict_types(tmp_path: Path) -> None:
    """The real CLI, from /: relative paths still resolve from the file's directory."""
    (tmp_path / "web.yml").write_text("{}\n")
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text('[http]\nweb_config_file = "web.yml"\n[daemon]\nstate_dir = "state"\n')
    run = subprocess.run([sys.executable, "-m", "virtwatch", "check-config", str(cfg)], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{cfg}: OK\n", "")
    assert load_settings(cfg).daemon.state_dir == str(tmp_path / "state")
    cfg.write_text('[stats]\npoll_interval = "15"\n')
    run = subprocess.run([sys.executable, "-m", "virtwatch", "check-config", str(cfg)], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines()[1] == ("  stats.poll_interval: expected a number, got the string '15' "
                                          "(TOML types are strict: no quotes around numbers)")
