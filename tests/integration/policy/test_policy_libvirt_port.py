"""LibvirtHypervisor on libvirt's in-process test driver: calls, error codes, deadlines."""

import threading
import time

import libvirt
import pytest

from virtwatch.model import DomainState, ShutoffReason
from virtwatch.policy.libvirt_port import LibvirtHypervisor
from virtwatch.policy.ports import METADATA_NS, ErrorCode, GuestInfo, Hypervisor, HypervisorError

NODE = """<node>
  <domain type="test"><name>a</name><uuid>11111111-2222-3333-4444-555555555551</uuid>
    <memory>65536</memory><os><type>hvm</type></os></domain>
  <domain type="test"><name>b</name><uuid>11111111-2222-3333-4444-555555555552</uuid>
    <memory>65536</memory><os><type>hvm</type></os></domain>
</node>"""


@pytest.fixture
def conn(tmp_path):
    p = tmp_path / "node.xml"
    p.write_text(NODE)
    c = libvirt.open(f"test://{p}")
    yield c
    c.close()


async def test_lifecycle_calls(conn):
    hv = LibvirtHypervisor(lambda: conn, timeout=5)
    assert isinstance(hv, Hypervisor)
    guests = sorted(await hv.list_guests())
    assert guests == [GuestInfo("a", "11111111-2222-3333-4444-555555555551", 1, 0, False, True),
                      GuestInfo("b", "11111111-2222-3333-4444-555555555552", 1, 0, False, True)]
    await hv.destroy("a")
    assert await hv.state("a") == (DomainState.SHUTOFF, ShutoffReason.DESTROYED)
    await hv.start("a")
    assert (await hv.state("a"))[0] == DomainState.RUNNING
    await hv.managed_save("a")
    assert await hv.state("a") == (DomainState.SHUTOFF, ShutoffReason.SAVED)
    assert await hv.has_managed_save("a") is True
    await hv.start("a")
    assert await hv.has_managed_save("a") is False
    await hv.managed_save("a")
    await hv.remove_managed_save("a")
    assert await hv.has_managed_save("a") is False
    await hv.start("a")
    conn.lookupByName("a").suspend()
    assert (await hv.state("a"))[0] == DomainState.PAUSED
    await hv.resume("a")
    assert (await hv.state("a"))[0] == DomainState.RUNNING
    await hv.shutdown("a")
    assert (await hv.state("a"))[0] == DomainState.SHUTOFF


async def test_errors_carry_libvirt_codes(conn):
    hv = LibvirtHypervisor(lambda: conn, timeout=5)
    with pytest.raises(HypervisorError) as exc:
        await hv.start("a")   # running
    # the test driver says INTERNAL_ERROR where the QEMU driver says OPERATION_INVALID: the engine
    # therefore re-reads the state after a failed start instead of trusting the code alone
    assert exc.value.code == libvirt.VIR_ERR_INTERNAL_ERROR == ErrorCode.INTERNAL_ERROR
    assert "already running" in exc.value.message
    with pytest.raises(HypervisorError) as exc:
        await hv.state("nope")
    assert exc.value.code == ErrorCode.NO_DOMAIN and exc.value.permanent
    await hv.destroy("b")
    await hv.managed_save("a")
    with pytest.raises(HypervisorError) as exc:
        await hv.start("a", force_boot=True)   # the test driver does not support FORCE_BOOT
    assert exc.value.code == ErrorCode.INVALID_ARG


async def test_metadata(conn):
    hv = LibvirtHypervisor(lambda: conn, timeout=5)
    assert await hv.metadata("a") is None
    conn.lookupByName("a").setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                       '<policy profile="critical"><on_crash>leave</on_crash></policy>', "vw",
                                       METADATA_NS, 0)
    xml = await hv.metadata("a")
    assert 'profile="critical"' in xml and "<on_crash>leave</on_crash>" in xml


async def test_not_connected(conn):
    hv = LibvirtHypervisor(lambda: None, timeout=5)
    with pytest.raises(HypervisorError) as exc:
        await hv.list_guests()
    assert exc.value.code == ErrorCode.INTERNAL_ERROR and "not connected" in exc.value.message


class _StuckConnection:
    """Stands in for a libvirtd that stopped answering: every lookup blocks."""

    def __init__(self):
        self.release = threading.Event()

    def lookupByName(self, name):
        self.release.wait(5)
        raise AssertionError("unreachable in the test")


async def test_deadline_and_one_call_per_guest():
    stuck = _StuckConnection()
    hv = LibvirtHypervisor(lambda: stuck, timeout=0.2, max_in_flight=4)
    t0 = time.monotonic()
    with pytest.raises(HypervisorError) as exc:
        await hv.state("x")
    assert exc.value.code == ErrorCode.OPERATION_TIMEOUT
    assert 0.15 < time.monotonic() - t0 < 1.0
    stuck.release.set()
