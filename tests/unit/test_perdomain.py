"""The per-domain fallback's pure pieces: which groups it stands in for, the domain XML's
devices, and the translation of the classic calls' answers into the bulk call's fields.

The readings are real: recorded from libvirt 9.0's test driver (``test:///default``, guest
``test``) with libvirt-python, one call each, as :func:`read_guest` makes them.
"""

from __future__ import annotations

from prometheus_client.core import Metric

from virtwatch.metrics.domain import domain_families, stats_source_family
from virtwatch.state import GuestView
from virtwatch.virt.devices import DomainDevices, Interface
from virtwatch.virt.perdomain import (
    Disk,
    Readings,
    devices_from_xml,
    group_sources,
    groups_present,
    missing_groups,
    translate,
)
from virtwatch.virt.stats import DomainStats, Snapshot

REQUESTED = ("state", "cpu", "balloon", "vcpu", "interface", "block")

# test:///default, guest "test": dom.XMLDesc(0), trimmed of elements the reader ignores
TEST_XML = """<domain type='test' id='1'>
  <name>test</name>
  <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
  <devices>
    <disk type='file' device='disk'>
      <source file='/guest/diskimage1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='aa:bb:cc:dd:ee:ff'/>
      <source network='default'/>
      <target dev='testnet0'/>
    </interface>
    <memballoon model='virtio'/>
  </devices>
</domain>"""

# the answers of the classic calls for that guest
INFO = [1, 8388608, 2097152, 2, 1796204655701033000]                     # dom.info()
CPU_STATS = [{"cpu_time": 48772617035, "user_time": 5540000000, "system_time": 6460000000}]  # getCPUStats(True)
VCPUS = [(0, 1, 179620465570108, 15), (1, 1, 179620465570108, 15)]       # dom.vcpus()[0]
MEMORY = {"actual": 2097152, "swap_in": 0, "swap_out": 0, "major_fault": 0, "minor_fault": 0, "unused": 1048576,
          "available": 2097152, "usable": 1048576, "last_update": 627319920, "disk_caches": 262144,
          "hugetlb_pgalloc": 0, "hugetlb_pgfail": 0, "rss": 1048576}    # dom.memoryStats()
BLOCK_STATS = (179620465570110, 89810232785055, 59873488523370, 44905116392527, 898102327)  # blockStats("vda")
BLOCK_INFO = [1099506450432, 1099511627776, 1099511627776]               # blockInfo("vda")
IF_STATS = (179620465570111, 17962046557011, 1796204655, 898102327, 89810232785055, 16329133233646, 598734885,
            449051163)                                                    # interfaceStats("testnet0")

READINGS = Readings(info=INFO, cpu_stats=CPU_STATS, vcpus=VCPUS, vcpu_max=2, memory=MEMORY,
                    disks=[(Disk("vda", "/guest/diskimage1"), BLOCK_STATS, BLOCK_INFO)],
                    nics=[("testnet0", IF_STATS)])


def test_the_groups_a_bulk_answer_has() -> None:
    # what the test driver's getAllDomainStats answers, whatever the flags
    assert groups_present({"state.state": 1, "state.reason": 0}, REQUESTED) == set()
    qemu_like = {"state.state": 1, "cpu.time": 5, "balloon.current": 1, "vcpu.current": 1, "net.count": 0,
                 "block.count": 1, "block.0.name": "vda"}
    assert groups_present(qemu_like, REQUESTED) == {"cpu", "balloon", "vcpu", "interface", "block"}
    assert groups_present(qemu_like, ("state", "cpu")) == {"cpu"}


def test_missing_groups_and_their_sources() -> None:
    assert missing_groups(REQUESTED, set()) == ("cpu", "balloon", "vcpu", "interface", "block")
    assert missing_groups(REQUESTED, {"cpu", "block"}) == ("balloon", "vcpu", "interface")
    assert missing_groups(("state", "perf", "cpu"), set()) == ("cpu",)  # no per-domain call gives perf
    assert group_sources(("state", "cpu", "block", "perf"), {"block"}) == {
        "state": "bulk", "cpu": "per_domain", "block": "bulk", "perf": "none"}


def test_devices_from_the_domain_xml() -> None:
    disks, nics = devices_from_xml(TEST_XML)
    assert disks == [Disk("vda", "/guest/diskimage1")]
    assert nics == ["testnet0"]
    xml = ("<domain><devices><disk device='cdrom'><target dev='sda'/></disk>"
           "<disk type='block'><source dev='/dev/vg/x'/><target dev='vdb'/></disk>"
           "<disk type='network'><source protocol='rbd' name='pool/img'/><target dev='vdc'/></disk>"
           "<interface type='user'><mac address='52:54:00:00:00:01'/></interface></devices></domain>")
    disks, nics = devices_from_xml(xml)
    assert disks == [Disk("sda", None), Disk("vdb", "/dev/vg/x"), Disk("vdc", "pool/img")]
    assert nics == []  # no host-side device: nothing interfaceStats could name in the bulk call's terms


def test_translation_into_bulk_fields() -> None:
    st = translate(READINGS, REQUESTED)
    assert st["cpu.time"] == INFO[4]                       # virDomainGetInfo cpuTime, ns
    assert (st["cpu.user"], st["cpu.system"]) == (5540000000, 6460000000)
    assert (st["balloon.current"], st["balloon.maximum"]) == (2097152, 8388608)  # KiB, as the bulk call
    assert st["balloon.rss"] == 1048576 and st["balloon.last-update"] == 627319920
    assert "balloon.actual" not in st and "balloon.last_update" not in st
    assert (st["vcpu.current"], st["vcpu.maximum"]) == (2, 2)
    assert st["vcpu.1.time"] == 179620465570108 and st["vcpu.1.state"] == 1
    assert st["block.count"] == 1 and st["block.0.name"] == "vda" and st["block.0.path"] == "/guest/diskimage1"
    assert (st["block.0.rd.reqs"], st["block.0.rd.bytes"]) == BLOCK_STATS[:2]
    assert (st["block.0.wr.reqs"], st["block.0.wr.bytes"]) == BLOCK_STATS[2:4]
    assert (st["block.0.capacity"], st["block.0.allocation"], st["block.0.physical"]) == tuple(BLOCK_INFO)
    assert st["net.count"] == 1 and st["net.0.name"] == "testnet0"
    assert st["net.0.rx.bytes"] == IF_STATS[0] and st["net.0.tx.drop"] == IF_STATS[7]
    # nothing libvirt did not return: no wait/delay (virDomainGetVcpus has none), no flush figures
    assert not any(k.endswith((".wait", ".delay", ".fl.reqs", ".rd.times")) for k in st)


def test_only_the_groups_asked_for() -> None:
    assert set(translate(READINGS, ("cpu",))) == {"cpu.time", "cpu.user", "cpu.system"}
    assert set(translate(READINGS, ("balloon",))) == {"balloon.current", "balloon.maximum",
                                                      *(f"balloon.{k}" for k in MEMORY if k not in (
                                                          "actual", "last_update")), "balloon.last-update"}
    assert all(k.startswith("net.") for k in translate(READINGS, ("interface",)))


def test_refused_calls_and_unknown_values_give_no_field() -> None:
    # getCPUStats refused (None), a driver without memory stats ({}), -1 for figures it lacks,
    # an empty drive (no source: not asked)
    r = Readings(info=INFO, cpu_stats=None, memory={}, vcpus=None, vcpu_max=None,
                 disks=[(Disk("sda", None), None, None), (Disk("vda", "/img"), (10, 4096, -1, -1, -1), None)],
                 nics=[("vnet0", None)])
    st = translate(r, REQUESTED)
    assert "cpu.user" not in st and st["cpu.time"] == INFO[4]
    assert {k for k in st if k.startswith("balloon.")} == {"balloon.current", "balloon.maximum"}
    assert {k for k in st if k.startswith("vcpu.")} == {"vcpu.current"}
    assert st["block.count"] == 2 and "block.0.path" not in st and "block.0.rd.bytes" not in st
    assert (st["block.1.rd.reqs"], st["block.1.rd.bytes"]) == (10, 4096)
    assert "block.1.wr.bytes" not in st and "block.1.errors" not in st
    assert st["net.count"] == 1 and st["net.0.name"] == "vnet0" and "net.0.rx.bytes" not in st
    # the guest is not running: read_guest asks nothing, and nothing comes out
    assert translate(Readings(), REQUESTED) == {}


def _samples(fams: list[Metric], name: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for f in fams for s in f.samples if s.name == name}


#: The NIC of test:///default's guest "test" (its live XML: no alias, so the MAC names it).
TEST_NIC = DomainDevices(interfaces=(Interface(alias="", mac="aa:bb:cc:dd:ee:ff", target="testnet0", type="network",
                                               source="default", bridge="", model=""),), balloon_period=0)


def test_the_existing_mapping_renders_the_translated_fields() -> None:
    st = {"state.state": 1, "state.reason": 1, **translate(READINGS, REQUESTED)}
    snap = Snapshot(seq=1, time=100.0, duration=0.01, host=None,
                    domains={"u": DomainStats("test", "u", st, stale=False, collected_at=100.0, devices=TEST_NIC)})
    g = GuestView(name="test", uuid="u", state=1, reason=1)
    fams = domain_families([g], snap)
    assert _samples(fams, "libvirt_domain_cpu_time_seconds_total") == {("test",): INFO[4] * 1e-9}
    assert _samples(fams, "libvirt_domain_memory_balloon_current_bytes") == {("test",): 2097152 * 1024}
    assert _samples(fams, "libvirt_domain_vcpu_time_seconds_total") == {
        ("test", "0"): VCPUS[0][2] * 1e-9, ("test", "1"): VCPUS[1][2] * 1e-9}
    assert _samples(fams, "libvirt_domain_block_read_bytes_total") == {("test", "vda"): BLOCK_STATS[1]}
    assert _samples(fams, "libvirt_domain_interface_receive_bytes_total") == {
        ("test", "aa:bb:cc:dd:ee:ff"): IF_STATS[0]}


def test_stats_source_family() -> None:
    fam = stats_source_family({"state": "bulk", "cpu": "per_domain", "perf": "none"})
    assert fam.name == "virtwatch_stats_source" and fam.type == "gauge"
    assert _samples([fam], "virtwatch_stats_source") == {
        ("state", "bulk"): 1, ("state", "per_domain"): 0, ("cpu", "bulk"): 0, ("cpu", "per_domain"): 1,
        ("perf", "bulk"): 0, ("perf", "per_domain"): 0}
