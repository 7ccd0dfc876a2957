""":class:`~virtwatch.policy.ports.Hypervisor` on a real libvirt connection.

Every call runs in a worker thread (``asyncio.to_thread``) under
``asyncio.timeout`` (3.11's ``wait_for`` can swallow a cancellation); at most ``max_in_flight`` calls run at once and
at most one per guest (a timed-out wait does not cancel the C call, so a
guest stuck in libvirt must not pile up threads). libvirt errors become
:class:`HypervisorError` with ``get_error_code()``; a deadline becomes
``HypervisorError(OPERATION_TIMEOUT)``; no connection becomes
``HypervisorError(INTERNAL_ERROR)``... never a bare libvirt exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import libvirt

from .ports import METADATA_NS, ErrorCode, GuestInfo, HypervisorError

T = TypeVar("T")

#: ``virDomainJobOperation`` -> name (libvirt 4.3+; 0 = unknown operation).
JOB_OPERATIONS = {0: "unknown", 1: "start", 2: "save", 3: "restore", 4: "migration_in", 5: "migration_out",
                  6: "snapshot", 7: "snapshot_revert", 8: "dump", 9: "backup", 10: "snapshot_delete"}


class LibvirtHypervisor:
    """Hypervisor port over ``connection()``, a callable returning the current ``virConnect`` (or None when down).

    Args:
        connection: returns the live connection; called for every operation, so
            a reconnect is picked up without rebuilding this object.
        timeout: deadline per call, seconds.
        max_in_flight: concurrent calls (libvirtd allows 5 per client; keepalive shares them).
        runner: ``await runner(call_name, fn)`` runs ``fn()`` in a worker thread; the daemon
            passes its shared :class:`~virtwatch.virt.calls.Calls` (one budget of threads for
            every libvirt call); default ``asyncio.to_thread``.
    """

    def __init__(self, connection: Callable[[], libvirt.virConnect | None], timeout: float = 30.0,
                 max_in_flight: int = 4,
                 runner: Callable[[str, Callable[[], Any]], Awaitable[Any]] | None = None) -> None:
        self._connection = connection
        self._timeout = timeout
        self._runner = runner
        self._sem = asyncio.Semaphore(max_in_flight)
        self._guest_locks: dict[str, asyncio.Lock] = {}

    async def _call(self, what: str, guest: str | None, fn: Callable[[libvirt.virConnect], T]) -> T:
        conn = self._connection()
        if conn is None:
            raise HypervisorError(ErrorCode.INTERNAL_ERROR, f"{what}: not connected to libvirt")
        lock = self._guest_locks.setdefault(guest, asyncio.Lock()) if guest is not None else None

        def run() -> T:
            try:
                return fn(conn)
            except libvirt.libvirtError as err:
                raise HypervisorError(err.get_error_code() or ErrorCode.INTERNAL_ERROR,
                                      err.get_error_message() or str(err)) from None

        async def guarded() -> T:
            async with self._sem:
                if self._runner is not None:
                    return await self._runner(what, run)
                return await asyncio.to_thread(run)

        try:
            if lock is None:
                async with asyncio.timeout(self._timeout):
                    return await guarded()
            async with lock:
                async with asyncio.timeout(self._timeout):
                    return await guarded()
        except TimeoutError:
            raise HypervisorError(
                ErrorCode.OPERATION_TIMEOUT, f"{what}: no answer within {self._timeout:g} s"
            ) from None

    @staticmethod
    def _dom(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        return conn.lookupByName(name)

    async def start(self, name: str, *, force_boot: bool = False) -> None:
        """``virDomainCreateWithFlags`` (restores a managed-save image unless ``force_boot``)."""
        flags = libvirt.VIR_DOMAIN_START_FORCE_BOOT if force_boot else 0
        await self._call("start", name, lambda c: self._dom(c, name).createWithFlags(flags))

    async def resume(self, name: str) -> None:
        """``virDomainResume``."""
        await self._call("resume", name, lambda c: self._dom(c, name).resume())

    async def destroy(self, name: str) -> None:
        """``virDomainDestroy``."""
        await self._call("destroy", name, lambda c: self._dom(c, name).destroy())

    async def managed_save(self, name: str) -> None:
        """``virDomainManagedSave``."""
        await self._call("managed_save", name, lambda c: self._dom(c, name).managedSave(0))

    async def shutdown(self, name: str) -> None:
        """``virDomainShutdown`` (returns once requested)."""
        await self._call("shutdown", name, lambda c: self._dom(c, name).shutdown())

    async def has_managed_save(self, name: str) -> bool:
        """``virDomainHasManagedSaveImage``."""
        return bool(await self._call("has_managed_save", name, lambda c: self._dom(c, name).hasManagedSaveImage(0)))

    async def remove_managed_save(self, name: str) -> None:
        """``virDomainManagedSaveRemove``."""
        await self._call("remove_managed_save", name, lambda c: self._dom(c, name).managedSaveRemove(0))

    async def state(self, name: str) -> tuple[int, int]:
        """``virDomainGetState`` -> (state, reason)."""
        st = await self._call("state", name, lambda c: self._dom(c, name).state(0))
        return int(st[0]), int(st[1])

    async def list_guests(self) -> list[GuestInfo]:
        """``virConnectListAllDomains`` plus state/autostart/persistence of each (vanishing guests skipped)."""

        def run(conn: libvirt.virConnect) -> list[GuestInfo]:
            out = []
            for d in conn.listAllDomains(0):
                try:
                    st, reason = d.state(0)
                    out.append(
                        GuestInfo(
                            d.name(), d.UUIDString(), int(st), int(reason), bool(d.autostart()), bool(d.isPersistent())
                        )
                    )
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return out

        return await self._call("list_guests", None, run)

    async def metadata(self, name: str) -> str | None:
        """``virDomainGetMetadata(ELEMENT, METADATA_NS)``; None when the guest has none."""

        def run(conn: libvirt.virConnect) -> Any:
            try:
                return self._dom(conn, name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        return await self._call("metadata", name, run)

    async def reset(self, name: str) -> None:
        """``virDomainReset``."""
        await self._call("reset", name, lambda c: self._dom(c, name).reset(0))

    async def job(self, name: str) -> str | None:
        """``virDomainGetJobStats``: None when its ``type`` is ``VIR_DOMAIN_JOB_NONE`` (or the driver
        has no jobs: ``VIR_ERR_NO_SUPPORT``), else the ``operation`` (:data:`JOB_OPERATIONS`)."""

        def run(conn: libvirt.virConnect) -> str | None:
            try:
                stats = self._dom(conn, name).jobStats(0)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return None  # a driver without jobs (the test driver) runs no migration or save
                raise
            if int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_NONE:
                return None
            op = int(stats.get("operation", 0))
            return JOB_OPERATIONS.get(op, f"operation {op}")

        return await self._call("job", name, run)
