"""The unit's MemoryDenyWriteExecute=yes must not break virtwatch's Python stack.

systemd enforces MemoryDenyWriteExecute= with the kernel's PR_SET_MDWE where
available (Linux >= 6.3), else with seccomp. This test applies the same
kernel flag to a child interpreter, proves W+X mappings are refused, then
imports every runtime dependency (C extensions included) and serves and
fetches an HTTP request through the web-security stack.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("NO-MDWE", ctypes.get_errno()); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("WX-ALLOWED"); sys.exit(1)
    except OSError:
        pass
    import asyncio, aiohttp, bcrypt, yaml, pydantic, structlog, prometheus_client, libvirt
    from aiohttp import web
    from virtwatch.web import WebConfig, build_app_kwargs, build_site_kwargs
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    cfg = WebConfig(basic_auth_users={"u": h})

    async def main():
        app = web.Application(**build_app_kwargs(cfg))
        app.router.add_get("/", lambda r: web.Response(text="hi"))
        runner = web.AppRunner(app); await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, **build_site_kwargs(cfg)); await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/", headers={"Authorization": "Basic dTpwdw=="}) as r:
                print("STATUS", r.status, await r.text())
        await runner.cleanup()

    asyncio.run(main())
    """
)


def test_python_stack_runs_under_memory_deny_write_execute() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    if r.stdout.startswith("NO-MDWE"):
        pytest.skip(f"kernel without PR_SET_MDWE: {r.stdout.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "STATUS 200 hi"
