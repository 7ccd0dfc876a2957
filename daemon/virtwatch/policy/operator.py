"""Operator commands and introspection: hold, release, reset, runtime override; snapshots, explain.

:class:`Operator` changes a guest's intent or policy at an operator's request
(``virtwatch hold|release|reset|override``, through the control socket), each
change committed before it answers, and reads the engine's state for metrics,
status and ``virtwatch explain`` without calling libvirt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ..model import ACTIVE
from . import budget
from .classify import Transition, classify_state
from .decide import decide
from .guests import GuestTable
from .model import Explanation, GuestEntry, GuestSnapshot
from .select import select, validate_override


class Operator:
    """The operator side of the engine whose guest table it is given.

    Args:
        table: the engine's :class:`~virtwatch.policy.guests.GuestTable`.
        recover: asks the engine to recover a guest now (``recover(guest, why)``: its worker
            checks the guest and starts it if it should run).
    """

    def __init__(self, table: GuestTable, recover: Callable[[GuestEntry, str], None]) -> None:
        self._t = table
        self._recover = recover
        self._clock = table.clock
        self._settings = table.settings
        self._log = table.log

    async def hold(self, name: str) -> GuestSnapshot:
        """Operator hold: intent ``held``, pending action cancelled; nothing acts on the guest. Raises KeyError."""
        g = self._t.known(name)
        g.pending_due = None
        await self._t.persist(g, g.st.replace(intent="held", pending_action=None,
                                              history=g.st.history.replace(next_retry=None)))
        self._log.info("policy_hold", guest=name, uuid=g.st.uuid)
        return self._snap(g)

    async def release(self, name: str) -> GuestSnapshot:
        """Release a hold: intent follows the live state (running if active, else stopped). Raises KeyError."""
        g = self._t.known(name)
        active = g.live is not None and g.live[0] in ACTIVE
        await self._t.persist(g, g.st.replace(intent="running" if active else "stopped"))
        self._log.info("policy_release", guest=name, uuid=g.st.uuid, intent=g.st.intent)
        return self._snap(g)

    async def reset(self, name: str) -> GuestSnapshot:
        """Operator reset: clear given-up, failures and backoff; restart at once if intent is running and it is off.

        Raises KeyError for an unknown guest.
        """
        g = self._t.known(name)
        g.pending_due = None
        st = g.st.replace(history=budget.reset(g.st.history), pending_action=None)
        await self._t.persist(g, st)
        self._log.info("policy_reset", guest=name, uuid=g.st.uuid)
        if st.intent == "running":
            self._recover(g, "operator reset")
        return self._snap(g)

    async def set_override(self, name: str, values: Mapping[str, Any] | None) -> GuestSnapshot:
        """Replace (or clear with None/{}) the runtime policy override of a guest: per-guest
        keys, ``profile``, ``mode``, validated by :func:`~virtwatch.policy.select.validate_override`
        and persisted. Raises KeyError (unknown guest), ValueError (naming every bad key)."""
        g = self._t.known(name)
        clean = validate_override(values or {}, self._settings)
        await self._t.persist(g, g.st.replace(override=MappingProxyType(clean)))
        self._log.info("policy_override", guest=name, uuid=g.st.uuid, override=clean)
        self._t.selection_changed(name)
        return self._snap(g)

    def _snap(self, g: GuestEntry) -> GuestSnapshot:
        """One guest's policy state now."""
        sel = self._t.selection(g)
        h = g.st.history
        return GuestSnapshot(g.st.name, g.st.uuid, g.st.intent, sel.managed, sel.mode, h.given_up, h.given_up_reason,
                             h.next_retry, g.st.pending_action, h.attempt,
                             len(budget.window(h, self._clock.time(), sel.policy)), MappingProxyType(dict(h.restarts)),
                             g.live[0] if g.live else None, g.live[1] if g.live else None,
                             MappingProxyType(dict(g.st.override)), g.st.migrated_to)

    def guests(self) -> Mapping[str, GuestSnapshot]:
        """Every guest libvirt still lists, by name (sorted)."""
        return MappingProxyType({n: self._snap(g) for n, g in sorted(self._t.guests.items()) if not g.gone})

    def explain(self, name: str) -> Explanation:
        """Merged policy with sources and the decision the engine would take now. Raises KeyError."""
        g = self._t.known(name)
        sel = self._t.selection(g)
        if g.live is None:
            now_text = "state unknown (not yet resynced)"
        else:
            cls = classify_state(*g.live)
            if g.st.pending_action:
                now_text = f"{g.st.pending_action} pending at {g.st.history.next_retry}"
            elif cls.transition == Transition.STARTED:
                now_text = f"{name} is running: nothing to do"
            elif cls.is_stop:
                d = decide(self._t.record(g), cls, g.st.history, self._clock.time(), sel, 0.0)
                now_text = d.message(sel.mode)
            else:
                now_text = cls.note or "nothing to do"
        return Explanation(name, g.st.uuid, sel.managed, sel.mode, sel.mode_source, g.st.intent,
                           g.live[0] if g.live else None, g.live[1] if g.live else None,
                           MappingProxyType(sel.policy.model_dump()), sel.sources, sel.matched, sel.errors,
                           g.st.history, g.st.pending_action, now_text)

    def console_capture(self, name: str) -> int | None:
        """Guest ``name``'s ``console_buffer`` (KiB) when its merged policy sets
        ``capture_console`` (runtime override, domain metadata once read,
        ``[[match]]`` rules, profile, defaults), else None. Pure lookup; never
        raises, never calls libvirt."""
        g = self._t.guests.get(name)
        sel = select(self._settings, name, "", None) if g is None else self._t.selection(g)
        return sel.policy.console_buffer if sel.policy.capture_console else None
