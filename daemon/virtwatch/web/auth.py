"""HTTP basic auth against bcrypt hashes, and the web config's response headers.

:func:`basic_auth_middleware` checks ``Authorization: Basic`` credentials:

- bcrypt runs in a worker thread (it costs ~0.25 s at cost 12 and would
  otherwise stall the event loop and the systemd watchdog), at most
  ``max_concurrent_checks`` at a time, so a password-guessing client cannot
  monopolise the CPU;
- an unknown user is checked against a dummy hash of the same cost, so the
  response time does not reveal which users exist;
- a successful check is cached under HMAC-SHA-256(user, password) with a
  per-middleware random key (never the password itself), so Prometheus
  scraping every 15 s pays bcrypt once, not on every scrape;
- failures get ``401`` with ``WWW-Authenticate: Basic realm="virtwatch"``.

Passwords longer than 72 bytes are always rejected (bcrypt ignores bytes
past 72, so accepting them would accept many passwords for one hash).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import structlog
from aiohttp import web

__all__ = ["AUTH_USER_KEY", "basic_auth_middleware", "headers_middleware"]

_log = structlog.get_logger("virtwatch.web.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: ``request[AUTH_USER_KEY]`` holds the authenticated user name (str).
#: A ``web.RequestKey`` where aiohttp has them (3.12+), else a plain string.
AUTH_USER_KEY: Any = (
    web.RequestKey("virtwatch_auth_user", str) if hasattr(web, "RequestKey") else "virtwatch.auth_user"
)

_BCRYPT_MAX_PASSWORD = 72


def _cost(hashed: bytes) -> int:
    """The cost factor of a ``$2b$NN$...`` hash."""
    return int(hashed.split(b"$")[2])


def _parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """``Basic base64(user:password)`` -> (user, password bytes), or None if malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user_b, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        user = user_b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, password


def basic_auth_middleware(
    users: Mapping[str, str],
    *,
    realm: str = "virtwatch",
    exempt_paths: Collection[str] = (),
    cache_size: int = 256,
    max_concurrent_checks: int = 4,
) -> Middleware:
    """An aiohttp middleware requiring basic auth for every path but ``exempt_paths``.

    ``users`` maps user name -> bcrypt hash (``$2a$``/``$2b$``/``$2y$``), as
    validated by :class:`virtwatch.web.webconfig.WebConfig`; it must not be
    empty. ``exempt_paths`` are exact request paths served without auth.
    ``cache_size`` bounds the successful-login cache (LRU, entries).
    The authenticated user is stored in ``request[AUTH_USER_KEY]``.

    Builds a dummy hash at the highest cost among ``users`` (one bcrypt
    hash: ~0.25 s at cost 12) before returning. Raises ValueError for an
    empty ``users`` or a malformed hash.
    """
    if not users:
        raise ValueError("basic_auth_middleware needs at least one user")
    hashes = {u: h.encode("ascii") for u, h in users.items()}
    try:
        cost = max(_cost(h) for h in hashes.values())
    except (IndexError, ValueError):
        raise ValueError("basic_auth_users: malformed bcrypt hash") from None
    import bcrypt  # only with users: keeps the bcrypt library out of a daemon that has none (issue 16)

    dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
    cache_key = secrets.token_bytes(32)
    cache: OrderedDict[bytes, None] = OrderedDict()
    checks = asyncio.Semaphore(max_concurrent_checks)
    exempt = frozenset(exempt_paths)
    challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}

    def fingerprint(user: str, password: bytes) -> bytes:
        ub = user.encode("utf-8")
        return hmac.new(cache_key, len(ub).to_bytes(4, "big") + ub + password, hashlib.sha256).digest()

    def check(user: str, password: bytes) -> bool:
        """Runs in a worker thread: one bcrypt verification whatever the input."""
        known = hashes.get(user)
        target = known if known is not None else dummy
        too_long = len(password) > _BCRYPT_MAX_PASSWORD
        ok = bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], target)
        return ok and known is not None and not too_long

    async def verify(user: str, password: bytes) -> bool:
        fp = fingerprint(user, password)
        if fp in cache:  # the fingerprint covers user and password
            cache.move_to_end(fp)
            return True
        async with checks:
            ok = await asyncio.get_running_loop().run_in_executor(None, check, user, password)
        if ok:
            cache[fp] = None
            cache.move_to_end(fp)
            while len(cache) > cache_size:
                cache.popitem(last=False)
        return ok

    @web.middleware
    async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt:
            return await handler(request)
        creds = _parse_basic(request.headers.get("Authorization"))
        if creds is not None and await verify(*creds):
            request[AUTH_USER_KEY] = creds[0]
            return await handler(request)
        _log.info(
            "http_auth_failed",
            remote=request.remote,
            path=request.path,
            reason="missing or malformed credentials" if creds is None else "bad credentials",
        )
        return web.Response(status=401, text="401 Unauthorized\n", headers=challenge)

    return basic_auth


def headers_middleware(headers: Mapping[str, str]) -> Middleware:
    """An aiohttp middleware adding ``headers`` to every response, errors included.

    Covers responses returned by handlers and ``web.HTTPException`` raised by
    them or by routing (404/405/413...); a streaming response a handler has
    already prepared is left alone. Put it first (outermost) in the
    middleware list so 401s from :func:`basic_auth_middleware` get them too.
    """
    fixed = dict(headers)

    @web.middleware
    async def add_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            for k, v in fixed.items():
                exc.headers.setdefault(k, v)
            raise
        if not response.prepared:
            for k, v in fixed.items():
                response.headers.setdefault(k, v)
        return response

    return add_headers
