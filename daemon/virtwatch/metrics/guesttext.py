"""The per-guest families written straight from the poll's statistics, without metric objects.

:func:`~virtwatch.metrics.domain.domain_families` builds prometheus-client families (one
``Sample`` with a label dict per value); rendering them costs about 0.17 s at 1,000 guests.
:class:`GuestText` writes the same text from the same inputs directly: each line is a cached
prefix (metric name and escaped, capped labels, built once per guest and device and kept
while the guest is) and the value. ``tests/unit/test_guest_text.py`` proves the bytes are
those of ``generate_latest(cap_labels(domain_families(...)))`` on the recorded real
statistics and on odd names, values and devices.

Output: the families in :func:`~virtwatch.metrics.domain.domain_families`' order, each with
its ``# HELP``/``# TYPE`` header (written also when it has no sample, as prometheus-client
does), and the series count of each family, for the series budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

from prometheus_client.utils import floatToGoString

from ..state import GuestView
from ..virt.devices import DomainDevices
from ..virt.stats import Snapshot
from .bounds import cap_label_value, exposed_name
from .domain import BALLOON_FIELDS, BLOCK_FIELDS, CPU_FIELDS, NET_FIELDS, VCPU_FIELDS, domain_families
from .text import escape_label_value

_EXACT = 2 ** 53  # ints below this convert to float exactly
_INF = float("inf")
#: Positions in domain_families' order: 7 state and identity families, then the scalars,
#: the vCPU families, block_info and the block families, interface_info and the NIC families.
_SCALAR = 7
_VCPU = _SCALAR + len(CPU_FIELDS) + len(BALLOON_FIELDS)
_BLOCK_INFO = _VCPU + len(VCPU_FIELDS)
_NET_INFO = _BLOCK_INFO + 1 + len(BLOCK_FIELDS)
_END = _NET_INFO + 1 + len(NET_FIELDS)
#: A guest's prefixes for more info label sets or devices than this are dropped and built
#: again: a guest whose NICs or disks churn must not grow the cache without bound.
_MAX_KEYS = 64


def value_text(v: Any) -> str:
    """``floatToGoString(v)`` (what prometheus-client writes for a sample value), with fast
    paths for ints and finite floats, the values libvirt's statistics give."""
    t = type(v)
    if t is float:
        if -_INF < v < 1e6:  # no exponent form to convert (NaN and the infinities fail the test)
            return repr(v)
    elif t is int:
        if -_EXACT < v < 1_000_000:
            return f"{v}.0"
        if 0 < v < _EXACT:  # Go's exponent form, as floatToGoString gives for positive values of 10**6 and more
            digits = str(v)
            rest = digits[1:].rstrip("0")
            return f"{digits[0]}.{rest}e+{len(digits) - 1:02d}" if rest else f"{digits[0]}e+{len(digits) - 1:02d}"
    return str(floatToGoString(v))  # type: ignore[no-untyped-call]


def _label(value: str) -> str:
    return escape_label_value(cap_label_value(value))


@dataclasses.dataclass(slots=True)
class _Prefixes:
    """One guest's line prefixes (``name{labels} ``), built on first use and kept while the guest is."""

    domain: str  # the escaped, capped ``domain`` label value
    scalar: list[str]
    fixed: list[str]  # state_code, state_reason_code, stats_stale, stats_age_seconds, memory_stats_stale, agent
    info: dict[tuple[str, str, str, str], str] = dataclasses.field(default_factory=dict)
    vcpu: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    block: dict[tuple[str, str], tuple[str, list[str]]] = dataclasses.field(default_factory=dict)
    net: dict[tuple[str, ...], tuple[str, list[str]]] = dataclasses.field(default_factory=dict)


class _Lines(NamedTuple):
    """The line lists of one render's per-device and per-vCPU families (views of :meth:`GuestText.render`'s)."""

    vcpu: list[list[str]]
    block_info: list[str]
    block: list[list[str]]
    net_info: list[str]
    net: list[list[str]]


class GuestText:
    """Writes the per-guest families; keeps each guest's line prefixes between renders.

    One render at a time per instance is the intended use; two at once (two worker threads)
    only build some prefixes twice.
    """

    def __init__(self) -> None:
        # the families' names, types and help from domain_families itself: one source of truth
        families = domain_families([], None)
        if len(families) != _END:
            raise RuntimeError(f"domain_families gives {len(families)} families, GuestText expects {_END}")
        self._names = [exposed_name(f) for f in families]
        self._headers = [f"# HELP {name} {_escape_doc(f.documentation)}\n# TYPE {name} {f.type}\n"
                         for name, f in zip(self._names, families, strict=True)]
        self._cache: dict[str, _Prefixes] = {}
        self._scalar_fields = [(key, scale) for key, _s, _k, scale, _d in CPU_FIELDS + BALLOON_FIELDS]
        # per-index stats keys (``vcpu.<i>.time``...), built once instead of at every lookup
        self._vcpu_fields = [(_Keys(f"vcpu.{{}}.{key}"), scale) for key, _s, _k, scale, _d in VCPU_FIELDS]
        self._block_fields = [(_Keys(f"block.{{}}.{key}"), scale) for key, _s, _k, scale, _d in BLOCK_FIELDS]
        self._net_keys = [_Keys(f"net.{{}}.{key}") for key, _s, _d in NET_FIELDS]

    @property
    def family_names(self) -> list[str]:
        """Every family's exposition name (a counter's with ``_total``), in output order."""
        return list(self._names)

    def render(self, guests: Iterable[GuestView], snapshot: Snapshot | None,
               migrating: Mapping[str, str] | None = None) -> list[list[str]]:
        """The sample lines of each family (in :attr:`family_names` order), as
        :func:`~virtwatch.metrics.domain.domain_families` gives them. Raises what formatting a
        bad value raises (``ValueError``, ``TypeError``)."""
        lines: list[list[str]] = [[] for _ in self._names]
        migrating = migrating or {}
        domains = snapshot.domains if snapshot is not None else {}
        old, cache = self._cache, dict[str, _Prefixes]()
        scalar_l = lines[_SCALAR:_VCPU]
        groups = _Lines(lines[_VCPU:_BLOCK_INFO], lines[_BLOCK_INFO], lines[_BLOCK_INFO + 1:_NET_INFO],
                        lines[_NET_INFO], lines[_NET_INFO + 1:_END])
        for g in guests:
            p = cache.get(g.name) or old.get(g.name) or self._prefixes(g.name)
            cache[g.name] = p
            self._state_lines(g, p, migrating.get(g.uuid, ""), lines)
            ds = domains.get(g.uuid)
            if ds is None or snapshot is None:
                continue
            fixed = p.fixed
            lines[3].append(fixed[2] + ("1.0\n" if ds.stale else "0.0\n"))
            if ds.memory_stale is not None:
                lines[5].append(fixed[4] + ("1.0\n" if ds.memory_stale else "0.0\n"))
            lines[4].append(fixed[3] + value_text(max(0.0, snapshot.time - ds.collected_at)) + "\n")
            get = ds.stats.get
            for (key, scale), out, prefix in zip(self._scalar_fields, scalar_l, p.scalar, strict=True):
                v = get(key)
                if isinstance(v, (int, float)):
                    out.append(f"{prefix}{value_text(v * scale)}\n")
            self._vcpu_lines(get, p, groups)
            self._block_lines(get, p, groups)
            self._nic_lines(get, ds.devices, p, groups)
        self._cache = cache
        return lines

    def _state_lines(self, g: GuestView, p: _Prefixes, migrating: str, lines: list[list[str]]) -> None:
        """``libvirt_domain_info``, ``…state_code``, ``…state_reason_code`` and ``…guest_agent_connected``."""
        info_key = (g.uuid, _tri(g.persistent), _tri(g.autostart), migrating)
        line = p.info.get(info_key)
        if line is None:
            _bound(p.info)
            line = p.info[info_key] = (
                f'libvirt_domain_info{{autostart="{_label(info_key[2])}",domain="{p.domain}",'
                f'migrating="{_label(migrating)}",persistent="{_label(info_key[1])}",'
                f'uuid="{_label(g.uuid)}"}} 1.0\n')
        lines[0].append(line)
        lines[1].append(p.fixed[0] + value_text(g.state) + "\n")
        lines[2].append(p.fixed[1] + value_text(g.reason) + "\n")
        if g.agent_connected is not None:
            lines[6].append(p.fixed[5] + ("1.0\n" if g.agent_connected else "0.0\n"))

    def _vcpu_lines(self, get: Callable[[str], Any], p: _Prefixes, lines: _Lines) -> None:
        """Per-vCPU families (``vcpu.<i>.time|wait|delay``)."""
        for i in range(int(get("vcpu.maximum") or get("vcpu.current") or 0)):
            prefixes = p.vcpu.get(i)
            if prefixes is None:
                _bound(p.vcpu)
                prefixes = p.vcpu[i] = self._device_prefixes(_VCPU, _BLOCK_INFO, f'domain="{p.domain}",vcpu="{i}"')
            for (key, scale), out, prefix in zip(self._vcpu_fields, lines.vcpu, prefixes, strict=True):
                v = get(key[i])
                if isinstance(v, (int, float)):
                    out.append(f"{prefix}{value_text(v * scale)}\n")

    def _block_lines(self, get: Callable[[str], Any], p: _Prefixes, lines: _Lines) -> None:
        """``libvirt_domain_block_info`` and the per-disk families (``block.<i>.*``), by target."""
        for i in range(_count(get, "block")):
            target = get(f"block.{i}.name")
            if not isinstance(target, str):
                continue
            path = get(f"block.{i}.path")
            key = (target, path if isinstance(path, str) else "")
            entry = p.block.get(key)
            if entry is None:
                _bound(p.block)
                labels = f'domain="{p.domain}",target="{_label(target)}"'
                entry = p.block[key] = (
                    f'libvirt_domain_block_info{{domain="{p.domain}",path="{_label(key[1])}",'
                    f'target="{_label(target)}"}} 1.0\n', self._device_prefixes(_BLOCK_INFO + 1, _NET_INFO, labels))
            lines.block_info.append(entry[0])
            for (field, scale), out, prefix in zip(self._block_fields, lines.block, entry[1], strict=True):
                v = get(field[i])
                if isinstance(v, (int, float)):
                    out.append(f"{prefix}{value_text(v * scale)}\n")

    def _nic_lines(self, get: Callable[[str], Any], devices: DomainDevices | None, p: _Prefixes,
                   lines: _Lines) -> None:
        """``libvirt_domain_interface_info`` and the per-NIC families (``net.<i>.*``), by the NIC's
        key from the live XML; a NIC the XML lacks, or a second one with the same key, gives nothing."""
        seen: set[str] = set()
        for i in range(_count(get, "net")):
            target = get(f"net.{i}.name")
            nic = devices.interface(target) if isinstance(target, str) and devices is not None else None
            if nic is None or nic.key in seen:
                continue
            seen.add(nic.key)
            key = (nic.key, nic.target or str(target), nic.mac, nic.type, nic.source, nic.bridge, nic.model)
            entry = p.net.get(key)
            if entry is None:
                _bound(p.net)
                dev, tgt, mac, typ, src, bridge, model = (_label(x) for x in key)
                entry = p.net[key] = (
                    f'libvirt_domain_interface_info{{bridge="{bridge}",device="{dev}",domain="{p.domain}",'
                    f'mac="{mac}",model="{model}",source="{src}",target="{tgt}",type="{typ}"}} 1.0\n',
                    self._device_prefixes(_NET_INFO + 1, _END, f'device="{dev}",domain="{p.domain}"'))
            lines.net_info.append(entry[0])
            for field, out, prefix in zip(self._net_keys, lines.net, entry[1], strict=True):
                v = get(field[i])
                if isinstance(v, (int, float)):
                    out.append(f"{prefix}{value_text(v)}\n")

    def text(self, lines: list[list[str]], left_out: Collection[str] = ()) -> str:
        """The families' text from :meth:`render`'s lines, leaving out the families named in ``left_out``."""
        return "".join(self._headers[i] + "".join(fam) for i, fam in enumerate(lines)
                       if self._names[i] not in left_out)

    def _prefixes(self, name: str) -> _Prefixes:
        domain = _label(name)
        return _Prefixes(domain, self._device_prefixes(_SCALAR, _VCPU, f'domain="{domain}"'),
                         self._device_prefixes(1, _SCALAR, f'domain="{domain}"'))

    def _device_prefixes(self, first: int, end: int, labels: str) -> list[str]:
        """``name{labels} `` for the families at positions ``first`` to ``end - 1``."""
        return [f"{self._names[i]}{{{labels}}} " for i in range(first, end)]


class _Keys(dict[int, str]):
    """``template.format(i)`` for each index ``i`` asked for, kept (``keys[3]``: ``"block.3.rd.bytes"``)."""

    def __init__(self, template: str) -> None:
        super().__init__()
        self._template = template

    def __missing__(self, i: int) -> str:
        key = self[i] = self._template.format(i)
        return key


def _escape_doc(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _bound(cache: dict[Any, Any]) -> None:
    if len(cache) >= _MAX_KEYS:
        cache.clear()


def _tri(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


def _count(get: Callable[[str], Any], prefix: str) -> int:
    n = get(f"{prefix}.count")
    return int(n) if isinstance(n, int) else 0
