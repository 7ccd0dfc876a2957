"""A real aiohttp server on 127.0.0.1 secured by a web config: TLS, basic auth, limits.

Exercised with real clients: the curl CLI and aiohttp's client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from virtwatch.web import (
    AUTH_USER_KEY,
    HTTPLimits,
    WebConfigError,
    build_app_kwargs,
    build_site_kwargs,
    load_web_config,
)

PKI = Any  # the conftest fixture type (conftest is not importable as a module)

USER, PASSWORD = "prometheus", "s3cret-scrape-pass"
COST = 4  # fast hashes for most tests; the timing test uses a higher cost


def basic(user: str, password: str) -> dict[str, str]:
    """An ``Authorization: Basic`` header (aiohttp 3.14 deprecates ``auth=BasicAuth``)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _hash(password: str, cost: int = COST) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=f"up 1\n# user={request.get(AUTH_USER_KEY)}\n")


async def echo(request: web.Request) -> web.Response:
    body = await request.read()  # raises 413 beyond client_max_size
    return web.Response(text=str(len(body)))


@contextlib.asynccontextmanager
async def serve(config_file: Path, limits: HTTPLimits = HTTPLimits(),
                exempt: tuple[str, ...] = ()) -> AsyncIterator[str]:
    """Serve /metrics and /echo with ``config_file``; yields the base URL."""
    cfg = load_web_config(config_file)
    app = web.Application(**build_app_kwargs(cfg, limits=limits, exempt_paths=exempt))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", metrics)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site_kw = build_site_kwargs(cfg, str(config_file))
    site = web.TCPSite(runner, "127.0.0.1", 0, **site_kw)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if site_kw["ssl_context"] else "http"
    try:
        yield f"{scheme}://{host}:{port}"
    finally:
        await runner.cleanup()


async def curl(*args: str) -> tuple[int, int, str]:
    """Run curl without blocking the loop (the server lives on it).

    Returns (curl exit code, HTTP status or 0, body).
    """
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await proc.communicate()
    text = out.decode()
    body, _, code = text.rpartition("\n")
    return proc.returncode or 0, int(code or 0), body


def tls_config(pki: PKI, tmp_path: Path, extra: str = "", users: dict[str, str] | None = None) -> Path:
    users = {USER: _hash(PASSWORD)} if users is None else users
    lines = [
        "tls_server_config:",
        f"  cert_file: {pki.server_crt.name}",  # relative: resolved against the file's dir
        f"  key_file: {pki.server_key}",
        *extra.splitlines(),
        "http_server_config:",
        "  headers:",
        "    X-Content-Type-Options: nosniff",
        "    Strict-Transport-Security: max-age=31536000",
        "basic_auth_users:",
        *[f"  {u}: '{h}'" for u, h in users.items()],
    ]
    path = pki.dir / f"web-{tmp_path.name}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def _curl_present() -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl missing: it is in .ci/apt-packages.txt")


async def test_curl_tls_and_basic_auth(pki: PKI, tmp_path: Path) -> None:
    async with serve(tls_config(pki, tmp_path)) as url:
        assert url.startswith("https://127.0.0.1:")
        rc, code, body = await curl("--cacert", str(pki.ca_crt), "-u", f"{USER}:{PASSWORD}", f"{url}/metrics")
        assert (rc, code) == (0, 200)
        assert body == "up 1\n# user=prometheus\n"
        # The name in the certificate works too.
        port = url.rsplit(":", 1)[1]
        rc, code, _ = await curl(
            "--cacert", str(pki.ca_crt), "--resolve", f"localhost:{port}:127.0.0.1",
            "-u", f"{USER}:{PASSWORD}", f"https://localhost:{port}/metrics",
        )
        assert (rc, code) == (0, 200)


async def test_curl_bad_or_missing_credentials_get_401(pki: PKI, tmp_path: Path) -> None:
    async with serve(tls_config(pki, tmp_path)) as url:
        for auth in (["-u", f"{USER}:wrong"], ["-u", f"nobody:{PASSWORD}"], []):
            rc, code, body = await curl("--cacert", str(pki.ca_crt), *auth, f"{url}/metrics")
            assert (rc, code) == (0, 401), auth
            assert "up 1" not in body
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-D", "-", "-o", "/dev/null", "--cacert", str(pki.ca_crt), f"{url}/metrics",
            stdout=asyncio.subprocess.PIPE,
        )
        headers, _ = await proc.communicate()
        lines = headers.decode().lower().splitlines()
        assert 'www-authenticate: basic realm="virtwatch"' in lines
        assert "x-content-type-options: nosniff" in lines  # configured headers on errors too


async def test_curl_rejects_server_not_signed_by_trusted_ca(pki: PKI, tmp_path: Path) -> None:
    async with serve(tls_config(pki, tmp_path)) as url:
        rc, code, _ = await curl("--cacert", str(pki.other_ca_crt), "-u", f"{USER}:{PASSWORD}", f"{url}/metrics")
        assert rc == 60  # CURLE_PEER_FAILED_VERIFICATION
        assert code == 0
        # Plain HTTP on the TLS port gets nothing useful.
        rc, code, _ = await curl(f"http://{url.removeprefix('https://')}/metrics")
        assert code != 200


async def test_curl_oversize_body_gets_413(pki: PKI, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100_000)
    small = tmp_path / "small.bin"
    small.write_bytes(b"y" * 1000)
    async with serve(tls_config(pki, tmp_path), limits=HTTPLimits(max_body_bytes=64 * 1024)) as url:
        common = ["--cacert", str(pki.ca_crt), "-u", f"{USER}:{PASSWORD}"]
        _, code, body = await curl(*common, "--data-binary", f"@{small}", f"{url}/echo")
        assert (code, body) == (200, "1000")
        _, code, _ = await curl(*common, "--data-binary", f"@{big}", f"{url}/echo")
        assert code == 413


async def test_aiohttp_client_verifies_against_ca(pki: PKI, tmp_path: Path) -> None:
    good = ssl.create_default_context(cafile=str(pki.ca_crt))
    bad = ssl.create_default_context(cafile=str(pki.other_ca_crt))
    async with serve(tls_config(pki, tmp_path)) as url, aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", ssl=good, headers=basic(USER, PASSWORD)) as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
            assert await r.text() == "up 1\n# user=prometheus\n"
            tls_obj = r.connection.transport.get_extra_info("ssl_object") if r.connection else None
            assert tls_obj is None or tls_obj.version() in ("TLSv1.2", "TLSv1.3")
        async with s.get(f"{url}/metrics", ssl=good, headers=basic(USER, "nope")) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Basic realm="virtwatch"'
        async with s.get(f"{url}/metrics", ssl=good) as r:
            assert r.status == 401
        async with s.get(f"{url}/nowhere", ssl=good, headers=basic(USER, PASSWORD)) as r:
            assert r.status == 404
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(f"{url}/metrics", ssl=bad, headers=basic(USER, PASSWORD)):
                pass


async def test_aiohttp_client_oversize_body_and_headers(pki: PKI, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    auth = basic(USER, PASSWORD)
    limits = HTTPLimits(max_body_bytes=4096, max_field_size=2048)
    async with serve(tls_config(pki, tmp_path), limits=limits) as url, aiohttp.ClientSession() as s:
        async with s.post(f"{url}/echo", data=b"a" * 4096, ssl=ctx, headers=auth) as r:
            assert (r.status, await r.text()) == (200, "4096")
        async with s.post(f"{url}/echo", data=b"a" * 4097, ssl=ctx, headers=auth) as r:
            assert r.status == 413
        async with s.get(f"{url}/metrics", ssl=ctx, headers={**auth, "X-Big": "b" * 4000}) as r:
            assert r.status in (400, 431)


async def test_malformed_authorization_headers_get_401(pki: PKI, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    good = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cases = [
        "Bearer abc",
        "Basic",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:" + PASSWORD.encode()).decode(),
        "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode() + b"x" * 80).decode(),  # > 72 bytes
    ]
    async with serve(tls_config(pki, tmp_path)) as url, aiohttp.ClientSession() as s:
        for header in cases:
            async with s.get(f"{url}/metrics", ssl=ctx, headers={"Authorization": header}) as r:
                assert r.status == 401, header
        async with s.get(f"{url}/metrics", ssl=ctx, headers={"Authorization": "basic " + good}) as r:
            assert r.status == 200  # the scheme is case-insensitive


async def test_password_longer_than_72_bytes_is_rejected_even_if_prefix_matches(pki: PKI, tmp_path: Path) -> None:
    long_pw = "p" * 72
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    async with serve(tls_config(pki, tmp_path, users={"long": _hash(long_pw)})) as url, aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics", ssl=ctx, headers=basic("long", long_pw)) as r:
            assert r.status == 200
        async with s.get(f"{url}/metrics", ssl=ctx, headers=basic("long", long_pw + "EXTRA")) as r:
            assert r.status == 401


async def test_exempt_path_skips_auth(pki: PKI, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    async with serve(tls_config(pki, tmp_path), exempt=("/healthz",)) as url, aiohttp.ClientSession() as s:
        async with s.get(f"{url}/healthz", ssl=ctx) as r:
            assert r.status == 200
        async with s.get(f"{url}/metrics", ssl=ctx) as r:
            assert r.status == 401


async def test_unknown_user_costs_a_bcrypt_and_success_is_cached(pki: PKI, tmp_path: Path) -> None:
    cost = 11
    hashed = _hash(PASSWORD, cost)
    one_bcrypt = float("inf")
    for _ in range(3):  # the fastest of 3: a loaded machine only ever adds time
        t0 = time.perf_counter()
        bcrypt.checkpw(b"x", hashed.encode())
        one_bcrypt = min(one_bcrypt, time.perf_counter() - t0)
    assert one_bcrypt > 0.03  # a meaningful cost on this machine

    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    async with serve(tls_config(pki, tmp_path, users={USER: hashed})) as url:
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def timed(user: str, pw: str) -> tuple[int, float]:
                t = time.perf_counter()
                async with s.get(f"{url}/metrics", headers=basic(user, pw)) as r:
                    await r.read()
                    return r.status, time.perf_counter() - t

            await timed(USER, "warm-up-the-connection")
            # the fastest of 3 of each: a loaded machine only ever adds time (failures are never cached)
            tries = [await timed("no-such-user", PASSWORD) for _ in range(3)]
            assert {st for st, _ in tries} == {401}
            unknown = min(t for _, t in tries)
            tries = [await timed(USER, "wrong-password") for _ in range(3)]
            assert {st for st, _ in tries} == {401}
            wrong = min(t for _, t in tries)
            # Both paths pay one bcrypt: user existence does not show in the timing.
            assert unknown > 0.5 * one_bcrypt
            assert wrong > 0.5 * one_bcrypt
            assert 0.5 < unknown / wrong < 2.0
            status, first = await timed(USER, PASSWORD)
            assert status == 200 and first > 0.5 * one_bcrypt
            status, cached = await timed(USER, PASSWORD)
            assert status == 200 and cached < 0.5 * one_bcrypt


async def test_client_certificates_required_and_verified(pki: PKI, tmp_path: Path) -> None:
    cfg = tls_config(
        pki, tmp_path,
        extra=f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.client_ca_crt}",
    )
    async with serve(cfg) as url:
        common = ["--cacert", str(pki.ca_crt), "-u", f"{USER}:{PASSWORD}"]
        rc, code, _ = await curl(*common, "--cert", str(pki.client_crt), "--key", str(pki.client_key),
                                 f"{url}/metrics")
        assert (rc, code) == (0, 200)
        rc, code, _ = await curl(*common, f"{url}/metrics")
        assert rc != 0 and code == 0  # handshake refused without a client cert
        # A client cert from an untrusted CA: the server certificate doubles as one.
        rc, code, _ = await curl(*common, "--cert", str(pki.server_crt), "--key", str(pki.server_key), f"{url}/metrics")
        assert rc != 0 and code == 0


async def test_client_certificate_optional(pki: PKI, tmp_path: Path) -> None:
    cfg = tls_config(
        pki, tmp_path,
        extra=f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki.client_ca_crt}",
    )
    async with serve(cfg) as url:
        common = ["--cacert", str(pki.ca_crt), "-u", f"{USER}:{PASSWORD}"]
        rc, code, _ = await curl(*common, f"{url}/metrics")
        assert (rc, code) == (0, 200)
        rc, code, _ = await curl(*common, "--cert", str(pki.client_crt), "--key", str(pki.client_key), f"{url}/metrics")
        assert (rc, code) == (0, 200)
        rc, code, _ = await curl(*common, "--cert", str(pki.server_crt), "--key", str(pki.server_key), f"{url}/metrics")
        assert rc != 0 and code == 0


async def test_min_version_tls13(pki: PKI, tmp_path: Path) -> None:
    cfg = tls_config(pki, tmp_path, extra="  min_version: TLS13")
    async with serve(cfg) as url:
        common = ["--cacert", str(pki.ca_crt), "-u", f"{USER}:{PASSWORD}"]
        rc, code, _ = await curl(*common, "--tls-max", "1.2", f"{url}/metrics")
        assert rc != 0 and code == 0
        rc, code, _ = await curl(*common, "--tlsv1.3", f"{url}/metrics")
        assert (rc, code) == (0, 200)


async def test_plain_http_without_web_config_sections(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text("# empty: plain HTTP, no auth\n")
    async with serve(cfg) as url:
        assert url.startswith("http://")
        rc, code, body = await curl(f"{url}/metrics")
        assert (rc, code, body) == (0, 200, "up 1\n# user=None\n")


def test_tls_file_problems_are_config_errors(pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yml"
    missing.write_text(f"tls_server_config:\n  cert_file: nope.crt\n  key_file: {pki.server_key}\n")
    with pytest.raises(WebConfigError) as exc:
        build_site_kwargs(load_web_config(missing), str(missing))
    assert exc.value.errors == [
        f"tls_server_config.cert_file: cannot read {tmp_path / 'nope.crt'}: No such file or directory"]

    mismatched = tmp_path / "mismatch.yml"
    mismatched.write_text(f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.client_key}\n")
    with pytest.raises(WebConfigError) as exc:
        build_site_kwargs(load_web_config(mismatched), str(mismatched))
    assert "KEY_VALUES_MISMATCH" in exc.value.errors[0]
    assert str(exc.value).startswith(str(mismatched))

    bad_ca = tmp_path / "badca.yml"
    bad_ca.write_text(
        f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.server_key}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.server_key}\n"
    )
    with pytest.raises(WebConfigError) as exc:
        build_site_kwargs(load_web_config(bad_ca), str(bad_ca))
    assert exc.value.errors[0].startswith("tls_server_config.client_ca_file: cannot load")
