"""A libvirt connection freed after the asyncio loop has closed (what happens to every
object still referenced at interpreter exit) must not deadlock the process.

libvirt removes a socket watch with the socket's lock held and the watch's free
callback takes that lock; calling it from inside the remove hung pytest's own exit in
CI (in ``gc.collect()`` of its unraisable-exception plugin) until CI gave up after 90
minutes. The process here is a real remote connection to libvirtd, so the socket watch
is real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostlib import URI

SCRIPT = """
import asyncio, sys, libvirt
from virtwatch.virt.aio import register_event_impl

async def main():
    impl = register_event_impl()
    conn = libvirt.open(sys.argv[1])
    conn.setKeepAlive(5, 3)
    conn.listAllDomains()
    return impl, conn

loop = asyncio.new_event_loop()
impl, conn = loop.run_until_complete(main())
loop.close()
conn.close()  # the last reference: libvirt removes the socket watch now
print("dropped_after_close", impl.dropped_after_close, flush=True)
"""


def test_connection_closed_after_the_loop_closed_does_not_deadlock(e2e_host: str, tmp_path: Path) -> None:
    script = tmp_path / "closed_loop.py"
    script.write_text(SCRIPT)
    try:
        proc = subprocess.run([sys.executable, str(script), URI], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise AssertionError("closing the connection after the loop closed deadlocked (killed after 60 s)") from err
    assert proc.returncode == 0, proc.stderr
    dropped = int(proc.stdout.split("dropped_after_close", 1)[1].split()[0])
    assert dropped >= 1, proc.stdout  # the socket watch (and keepalive timer) were removed on a closed loop
