"""Golden tests: metrics/guesttext.GuestText writes exactly what prometheus-client writes for
domain_families (label values capped as the exposition caps them)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import uuid
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

from virtwatch.metrics.bounds import TIERS, cap_labels, exposed_name
from virtwatch.metrics.domain import domain_families
from virtwatch.metrics.guesttext import GuestText, value_text
from virtwatch.state import GuestRegistry, GuestView, ResyncEntry
from virtwatch.virt.devices import DomainDevices, Interface
from virtwatch.virt.stats import DomainStats, Snapshot

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "domstats-libvirt9-qemu7.2.json"


class Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def library(guests: list[GuestView], snap: Snapshot | None, migrating: dict[str, str] | None = None,
            left_out: frozenset[str] = frozenset()) -> bytes:
    families = [f for f in cap_labels(domain_families(guests, snap, migrating)) if exposed_name(f) not in left_out]
    return generate_latest(Families(families))  # type: ignore[arg-type]


def direct(writer: GuestText, guests: list[GuestView], snap: Snapshot | None,
           migrating: dict[str, str] | None = None, left_out: frozenset[str] = frozenset()) -> bytes:
    return writer.text(writer.render(guests, snap, migrating), left_out).encode()


def recorded(copies: int, names: list[str] | None = None) -> tuple[list[GuestView], Snapshot]:
    """``copies`` × the recorded real getAllDomainStats answers (every group libvirt 9.0 gives
    a QEMU 7.2 guest), each guest with a NIC read from its XML."""
    real = json.loads(RECORDED.read_text())["domains"]
    reg, entries, doms = GuestRegistry(), [], {}
    for i in range(copies * len(real)):
        st = dict(real[i % len(real)]["stats"])
        name = names[i % len(names)] + str(i) if names else f"guest-{i:03d}"
        u = str(uuid.UUID(int=i + 1))
        entries.append(ResyncEntry(name, u, st["state.state"], st["state.reason"], i % 4 != 0,
                                   None if i % 5 == 0 else i % 2 == 0))
        taps = [st[f"net.{j}.name"] for j in range(st.get("net.count", 0))]
        nics = tuple(Interface(f"net{j}", f"52:54:00:00:{i % 256:02x}:{j:02x}", tap, "network", "default",
                               "virbr0", "virtio") for j, tap in enumerate(taps))
        doms[u] = DomainStats(name, u, st, i % 3 == 0, 1_700_000_000.0 + i, DomainDevices(nics, 5),
                              None if i % 7 == 0 else i % 2 == 1)
    reg.apply_resync(entries, 0)
    guests = [dataclasses.replace(g, agent_connected=k % 2 == 0) if k % 3 == 1 else g
              for k, g in enumerate(reg.guests())]
    return guests, Snapshot(1, 1_700_000_100.5, 0.01, doms, None)


def test_the_recorded_real_statistics_render_to_the_same_bytes() -> None:
    guests, snap = recorded(3)
    writer = GuestText()
    body = direct(writer, guests, snap, {guests[0].uuid: "out", guests[1].uuid: "in"})
    assert body.count(b"\n") > 1500
    assert b'libvirt_domain_interface_info{bridge="virbr0",device="net0"' in body
    assert body == library(guests, snap, {guests[0].uuid: "out", guests[1].uuid: "in"})
    # the second render reuses every prefix: same bytes; and a guest that changes state changes its line
    assert direct(writer, guests, snap, {guests[0].uuid: "out", guests[1].uuid: "in"}) == body
    moved = [GuestView(g.name, g.uuid, 5, 1, g.persistent, not g.autostart, agent_connected=True)
             if k == 2 else g for k, g in enumerate(guests)]
    assert direct(writer, moved, snap) == library(moved, snap)


def test_odd_names_devices_and_values_render_to_the_same_bytes() -> None:
    names = ['quote " and \\ backslash', "new\nline", "ünïcödé ✓", "x" * 300, "", "a{b}=c,d"]
    guests, snap = recorded(1, names)
    rng = random.Random(7)
    odd = [0, -1, 1, 9_999_999, 10_000_000, 12_345_678, 2 ** 53 - 1, 2 ** 53, 2 ** 64 - 1, 0.0, -0.0, 1e-9,
           123456.789, 1234567.8, 1e16, float("inf"), float("nan"), True, False]
    for k, ds in enumerate(snap.domains.values()):
        stats = dict(ds.stats)
        for key in list(stats)[::3]:
            if isinstance(stats[key], (int, float)) and not key.endswith((".count", "vcpu.maximum", "vcpu.current")):
                stats[key] = rng.choice(odd)
        stats.pop("cpu.user", None) if k % 2 else None  # NOWAIT leaves fields out
        stats["block.0.path"] = "/var/lib/libvirt/images/" + "very-long-" * 20 + '"odd".qcow2'
        object.__setattr__(ds, "stats", stats)
    # two NICs with one key (no churning series: the second is left out) and one the XML lacks
    ds = next(iter(snap.domains.values()))
    tap = ds.stats.get("net.0.name")
    object.__setattr__(ds, "devices", DomainDevices((Interface("", "52:54:00:aa:bb:cc", str(tap), "bridge",
                                                               'br"0', "br\\0", ""),)))
    writer = GuestText()
    assert direct(writer, guests, snap) == library(guests, snap)
    assert direct(writer, guests, None) == library(guests, None)
    assert direct(writer, [], snap) == library([], snap)


def test_left_out_tiers_match_the_filtered_library_text() -> None:
    guests, snap = recorded(2)
    writer = GuestText()
    left_out: frozenset[str] = frozenset()
    for _tier, families in TIERS:
        left_out |= families
        assert direct(writer, guests, snap, None, left_out) == library(guests, snap, None, left_out)


def test_value_text_is_float_to_go_string() -> None:
    rng = random.Random(11)
    values: list[object] = [0, 1, -1, 10 ** 7 - 1, 10 ** 7, 10 ** 15, 2 ** 53 - 1, 2 ** 53, -(2 ** 53), 10 ** 20,
                            0.1, 1e7, 1e-300, 5e-324, 1.7976931348623157e308, -1e300, float("inf"),
                            float("-inf"), float("nan"), True, False]
    values += [rng.randrange(0, 2 ** 64) >> rng.randrange(0, 64) for _ in range(5000)]
    values += [rng.random() * 10 ** rng.randrange(-12, 20) for _ in range(5000)]
    values += [rng.randrange(0, 2 ** 62) * 1e-9 for _ in range(2000)]
    for v in values:
        assert value_text(v) == floatToGoString(v), v  # type: ignore[no-untyped-call]
    assert math.isnan(float(value_text(float("nan"))))


def test_the_cache_follows_the_guests() -> None:
    guests, snap = recorded(2)
    writer = GuestText()
    writer.render(guests, snap)
    assert len(writer._cache) == len(guests)
    writer.render(guests[:3], snap)
    assert sorted(writer._cache) == sorted(g.name for g in guests[:3])
    renamed = [GuestView("renamed", guests[0].uuid, guests[0].state, guests[0].reason)]
    assert direct(writer, renamed, snap) == library(renamed, snap)
    assert sorted(writer._cache) == ["renamed"]
