"""ThreadSafeAsyncIOImpl.drain survives a timed-out drain (the daemon bounds
drain with wait_for at every stop; a reload stops and starts again)."""

from __future__ import annotations

import asyncio

from virtwatch.virt.aio import ThreadSafeAsyncIOImpl


async def test_drain_after_a_timed_out_drain() -> None:
    impl = ThreadSafeAsyncIOImpl(asyncio.get_running_loop())  # not registered: nothing else uses it
    impl._pending_inc()  # one callback libvirt has not freed yet
    for _ in range(2):
        try:
            await asyncio.wait_for(impl.drain(), 0.05)
        except TimeoutError:
            pass
    impl._pending_dec()
    await asyncio.wait_for(impl.drain(), 1.0)  # returns at once: nothing pending
    assert impl._pending == 0
