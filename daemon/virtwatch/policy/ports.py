"""Ports the policy engine acts through: the :class:`Hypervisor` protocol and its error.

The engine never imports libvirt. :mod:`virtwatch.policy.libvirt_port` implements
the protocol on a libvirt connection; :mod:`virtwatch.policy.fakes` in memory.
State and reason codes are libvirt's ``virDomainState`` / ``virDomain*Reason``
integers (mirrored in :class:`~virtwatch.model.DomainState` and the reason enums there).
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol, runtime_checkable

#: Our XML metadata namespace (``virDomainGetMetadata(ELEMENT, NS)``).
METADATA_NS = "https://virtwatch.dev/xmlns/policy/1"


class ErrorCode(enum.IntEnum):
    """The ``virErrorNumber`` codes the engine decides on (never on message text)."""

    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    XML_ERROR = 27
    NO_DOMAIN = 42
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    NO_DOMAIN_METADATA = 80
    AGENT_UNRESPONSIVE = 86
    SYSTEM_ERROR = 38
    OPERATION_FAILED = 9
    XML_DETAIL = 71
    INVALID_ARG = 8


#: Start errors that will not go away by retrying: give up at once.
PERMANENT_START_ERRORS = frozenset({ErrorCode.XML_ERROR, ErrorCode.CONFIG_UNSUPPORTED, ErrorCode.XML_DETAIL,
                                   ErrorCode.NO_DOMAIN, ErrorCode.INVALID_ARG})


class HypervisorError(Exception):
    """A failed hypervisor call. ``code`` is libvirt's ``virErrorNumber`` (see :class:`ErrorCode`)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = int(code)
        self.message = message
        super().__init__(f"[{self.code}] {message}")

    @property
    def already_running(self) -> bool:
        """True for libvirt's "domain is already running" (``VIR_ERR_OPERATION_INVALID``)."""
        return self.code == ErrorCode.OPERATION_INVALID

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help (configuration/XML errors, guest gone)."""
        return self.code in PERMANENT_START_ERRORS


class GuestInfo(NamedTuple):
    """One row of :meth:`Hypervisor.list_guests`."""

    name: str
    uuid: str
    state: int
    reason: int
    autostart: bool
    persistent: bool


@runtime_checkable
class Hypervisor(Protocol):
    """What the policy engine may do to guests. Every method raises :class:`HypervisorError`.

    Implementations bound every call with a deadline (timeout raises
    ``HypervisorError(ErrorCode.OPERATION_TIMEOUT, ...)``) and never block the loop.
    """

    async def start(self, name: str, *, force_boot: bool = False) -> None:
        """``virDomainCreate``: boot the guest, restoring its managed-save image if any.

        ``force_boot`` discards the image (``VIR_DOMAIN_START_FORCE_BOOT``).
        """

    async def resume(self, name: str) -> None:
        """``virDomainResume`` a paused guest."""

    async def destroy(self, name: str) -> None:
        """``virDomainDestroy``: hard stop."""

    async def managed_save(self, name: str) -> None:
        """``virDomainManagedSave``: save RAM to the managed image and stop."""

    async def shutdown(self, name: str) -> None:
        """``virDomainShutdown``: ask the guest to power off (returns before it has)."""

    async def has_managed_save(self, name: str) -> bool:
        """Whether a managed-save image exists."""

    async def remove_managed_save(self, name: str) -> None:
        """Delete the managed-save image."""

    async def state(self, name: str) -> tuple[int, int]:
        """``(state, reason)`` as ``virDomainGetState``."""

    async def list_guests(self) -> list[GuestInfo]:
        """Every defined or running guest."""

    async def metadata(self, name: str) -> str | None:
        """Our metadata element (namespace :data:`METADATA_NS`) as XML text, or None."""

    async def reset(self, name: str) -> None:
        """``virDomainReset``: hard reset of a running guest (no shutdown; it reboots at once)."""

    async def job(self, name: str) -> str | None:
        """The job libvirt runs on the guest (``virDomainGetJobStats`` ``operation``: ``migration_out``,
        ``save``, ``dump``...), or None when none runs."""
