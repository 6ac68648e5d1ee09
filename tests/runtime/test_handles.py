"""EventChannel, ForeignMemory and GuestRam: arguments checked before any syscall, errors
carrying errno/op/domid/layer, closed handles, and memory shared without copies."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

import pytest

from xendmop import DeviceModel
from xendmop.errors import ArgumentError, ClosedHandleError, XenError
from xendmop.mock import MockXen
from xendmop.runtime.dispatch import GuestMemoryError
from xendmop.runtime.evtchn import EventChannel, EvtchnDeviceFile
from xendmop.runtime.foreignmemory import ForeignMemory, GuestRam
from xendmop.runtime.pci import Bar, PciFunction
from xendmop.types import BufIoreq

from .helpers import Recorder, RecordingPciHost

PAGE = 4096


@pytest.fixture
def host() -> MockXen:
    return MockXen()


@pytest.fixture
def domid(host: MockXen) -> int:
    return host.create_domain(vcpus=1, hvm=True, memory_mb=1)


@pytest.fixture
def evtchn(host: MockXen) -> Iterator[EventChannel]:
    with EventChannel(host.open_device) as e:
        yield e


@pytest.fixture
def fmem(host: MockXen) -> Iterator[ForeignMemory]:
    with ForeignMemory(host.open_device) as f:
        yield f


# --- EventChannel ----------------------------------------------------------------------


def test_evtchn_loopback_pending_and_unmask(evtchn: EventChannel, domid: int) -> None:
    a = evtchn.bind_unbound_port(0)  # dom0 to itself: both ends in this handle
    b = evtchn.bind_interdomain(0, a)
    assert evtchn.pending() is None
    evtchn.notify(b)
    assert evtchn.pending() == a
    evtchn.notify(b)
    assert evtchn.pending() is None  # masked until written back
    evtchn.unmask(a)
    assert evtchn.pending() == a  # the event raised while masked is delivered now


@pytest.mark.parametrize(
    ("call", "err"),
    [
        (lambda e: e.unbind(99), errno.ENOTCONN),
        (lambda e: e.notify(99), errno.ENOTCONN),
        (lambda e: e.bind_interdomain(0x7000, 1), errno.ESRCH),
        # (bind_unbound_port to a missing domain is no error: Xen's evtchn_alloc_unbound records
        # the remote domid without looking it up, as the lab measured: "evtchn truncation")
    ],
)
def test_evtchn_errors_carry_context(evtchn: EventChannel, call: object, err: int) -> None:
    with pytest.raises(XenError) as info:
        call(evtchn)  # type: ignore[operator]
    assert info.value.errno == err and info.value.layer == "evtchn"
    assert info.value.op in str(info.value)


def test_evtchn_restrict(evtchn: EventChannel, domid: int) -> None:
    evtchn.restrict(domid)
    assert evtchn.restricted_to == domid
    with pytest.raises(PermissionError):
        evtchn.bind_unbound_port(domid)  # refused on a restricted handle
    with pytest.raises(PermissionError):
        evtchn.restrict(domid)  # only once


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda e: e.notify(0), ArgumentError),
        (lambda e: e.unmask(2**32), ArgumentError),
        (lambda e: e.notify("1"), TypeError),
        (lambda e: e.bind_interdomain(True, 1), TypeError),
        (lambda e: e.bind_unbound_port(0x10000), ArgumentError),
        (lambda e: e.restrict(0), ArgumentError),
        (lambda e: e.restrict(0x7FF0), ArgumentError),
    ],
)
def test_evtchn_misuse_refused_before_syscall(host: MockXen, evtchn: EventChannel, call: object, exc: type) -> None:
    before = len(host.events)
    with pytest.raises(exc):
        call(evtchn)  # type: ignore[operator]
    assert len(host.events) == before


def test_evtchn_closed(host: MockXen) -> None:
    e = EventChannel(host.open_device)
    e.close()
    e.close()  # idempotent
    with pytest.raises(ClosedHandleError):
        e.notify(1)
    with pytest.raises(ClosedHandleError):
        e.fileno()


def test_evtchn_real_device_bad_fd_is_ebadf() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    os.close(fd)  # a stale fd number: each call must fail with EBADF
    dev = EvtchnDeviceFile("/dev/xen/evtchn", fd)
    for call in (lambda: dev.read(4), lambda: dev.write(b"\1\0\0\0"), lambda: dev.ioctl(0, bytearray(4))):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        EventChannel(lambda path: EvtchnDeviceFile(path, fd))  # setting O_NONBLOCK fails first
    assert info.value.errno == errno.EBADF


# --- ForeignMemory -------------------------------------------------------------------------


def test_map_guest_frames_shares_memory(host: MockXen, fmem: ForeignMemory, domid: int) -> None:
    m = fmem.map(domid, [3, 4])
    assert m.ok and m.errors == (0, 0)
    host.guest_write(domid, 3 * PAGE + 10, b"guest")
    assert bytes(m.view[10:15]) == b"guest"  # the guest's store, seen through our mapping
    m.view[PAGE : PAGE + 2] = b"dm"
    assert host.guest_read(domid, 4 * PAGE, 2) == b"dm"
    fmem.unmap(m)
    assert m.closed


def test_map_reports_per_frame_errors(fmem: ForeignMemory, domid: int) -> None:
    m = fmem.map(domid, [1, 0x7FFFFFF, 2])
    assert m.errors[0] == 0 and m.errors[2] == 0 and m.errors[1] < 0 and not m.ok


def test_map_resource_ioreq_pages(dm_host: tuple[DeviceModel, MockXen], fmem: ForeignMemory, domid: int) -> None:
    dm, _ = dm_host
    sid = dm.create_ioreq_server(domid, BufIoreq.LEGACY)
    m = fmem.map_resource(domid, id=sid, frame=0, nr_frames=2)
    assert m.nr_frames == 2 and len(m.view) == 2 * PAGE
    with pytest.raises(XenError) as info:
        fmem.map_resource(domid, id=sid + 1, frame=1)
    assert info.value.errno == errno.ENOENT and info.value.layer == "privcmd" and info.value.domid == domid


@pytest.fixture
def dm_host(host: MockXen) -> Iterator[tuple[DeviceModel, MockXen]]:
    with DeviceModel.open("mock", xen=host) as dm:
        yield dm, host


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda f: f.map(1, []), ArgumentError),
        (lambda f: f.map(1, [-1]), ArgumentError),
        (lambda f: f.map(0x10000, [1]), ArgumentError),
        (lambda f: f.map_resource(1, nr_frames=0), ArgumentError),
        (lambda f: f.map_resource(1, frame=2**32), ArgumentError),
        (lambda f: f.map_resource(1, id="0"), TypeError),
        (lambda f: f.restrict(0x7FF0), ArgumentError),
    ],
)
def test_foreignmemory_misuse(host: MockXen, fmem: ForeignMemory, call: object, exc: type) -> None:
    before = len(host.events)
    with pytest.raises(exc):
        call(fmem)  # type: ignore[operator]
    assert len(host.events) == before


def test_foreignmemory_restrict(fmem: ForeignMemory, host: MockXen, domid: int) -> None:
    other = host.create_domain(vcpus=1, hvm=True, memory_mb=1)
    fmem.restrict(domid)
    with pytest.raises(PermissionError) as info:
        fmem.map(other, [1])
    assert info.value.errno == errno.EPERM
    assert fmem.map(domid, [1]).ok


def test_foreignmemory_closed(host: MockXen) -> None:
    f = ForeignMemory(host.open_device)
    f.close()
    with pytest.raises(ClosedHandleError):
        f.map(1, [1])


# --- GuestRam --------------------------------------------------------------------------------


def test_guest_ram_across_pages_and_bounded_cache(host: MockXen, fmem: ForeignMemory, domid: int) -> None:
    ram = GuestRam(fmem, domid, max_pages=2)
    host.guest_write(domid, PAGE - 2, b"abcd")
    assert ram.read(PAGE - 2, 4) == b"abcd"
    ram.write(2 * PAGE - 1, b"XY")
    assert host.guest_read(domid, 2 * PAGE - 1, 2) == b"XY"
    for gfn in range(10):
        ram.read(gfn * PAGE, 1)
    assert len(ram._pages) == 2
    ram.invalidate()
    assert not ram._pages


def test_guest_ram_in_buckets_maps_a_group_once_and_stays_bounded(
    host: MockXen, fmem: ForeignMemory, domid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []
    real_map = fmem.map

    def counting_map(d: int, gfns: Sequence[int]) -> object:  # the handle's own mapping type
        calls.append(list(gfns))
        return real_map(d, gfns)

    monkeypatch.setattr(fmem, "map", counting_map)
    ram = GuestRam(fmem, domid, max_pages=8, bucket=4)
    host.guest_write(domid, 4 * PAGE - 2, b"abcd")
    assert ram.read(4 * PAGE - 2, 4) == b"abcd"  # straddles buckets 0 and 1
    assert sorted(calls) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one MMAPBATCH per bucket, in either order
    for gfn in range(8):  # the same two buckets: no more mapping
        ram.read(gfn * PAGE, 8)
    assert len(calls) == 2
    ram.write(PAGE - 1, b"XYZ" * PAGE)  # 3 pages from the end of frame 0: buckets 0-1 again
    assert len(calls) == 2
    assert host.guest_read(domid, PAGE - 1, 3 * PAGE) == b"XYZ" * PAGE
    # A write wider than the whole cache still lands: no view is held across mappings.
    ram.write(0, bytes(range(256)) * (16 * PAGE // 256))
    assert host.guest_read(domid, 0, 16 * PAGE) == bytes(range(256)) * (16 * PAGE // 256)
    assert len(ram._pages) == 2
    ram.invalidate()
    assert not ram._pages


def test_guest_ram_bucket_refusals_are_per_frame(fmem: ForeignMemory, domid: int, host: MockXen) -> None:
    top = host.hypervisor.domains[domid].max_mapped_pfn  # the domain's last frame
    assert (top + 1) % 64, "the test wants a bucket with frames on both sides of the end"
    ram = GuestRam(fmem, domid, max_pages=128, bucket=64)
    host.guest_write(domid, top * PAGE, b"last")
    with pytest.raises(GuestMemoryError, match=f"gfn {top + 1:#x}"):
        ram.read((top + 1) * PAGE, 4)  # past the end, in the same bucket as the last frame
    assert ram.read(top * PAGE, 4) == b"last"  # its neighbour in that bucket still reads
    assert len(ram._pages) == 1
    with pytest.raises(GuestMemoryError):
        ram.read(1 << 40, 4)  # a bucket with no frame of the guest's is not kept
    assert len(ram._pages) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"bucket": 3}, "bucket=3"), ({"bucket": 8, "max_pages": 8}, "max_pages=8")]
)
def test_guest_ram_bad_bucket_options_are_refused_naming_them(
    fmem: ForeignMemory, domid: int, kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GuestRam(fmem, domid, **kwargs)


def test_guest_ram_outside_refused(fmem: ForeignMemory, domid: int) -> None:
    ram = GuestRam(fmem, domid)
    with pytest.raises(GuestMemoryError):
        ram.read(1 << 40, 4)
    with pytest.raises(GuestMemoryError):
        ram.write(-4, b"1234")
    limited = GuestRam(fmem, domid, limit=PAGE)
    with pytest.raises(GuestMemoryError):
        limited.read(PAGE - 2, 4)


# --- PciFunction (no server: a recording host) ---------------------------------------------------


def test_pci_bar_sizing_and_decode() -> None:
    fn = PciFunction(0x8086, 0x100E, 0x020000, bars=[Bar(0x20000, Recorder()), Bar(0x40, Recorder(), io=True)])
    fn.host = host = RecordingPciHost()
    fn.write(0x10, 4, 0xFFFFFFFF)
    assert fn.read(0x10, 4) == 0xFFFE0000
    fn.write(0x14, 4, 0xFFFFFFFF)
    assert fn.read(0x14, 4) == 0xFFFFFFC1
    fn.write(0x10, 4, 0xF0000000)
    fn.write(0x14, 4, 0xC000)
    assert host.log == []  # no decode yet
    fn.write(0x04, 2, 0x3)
    assert sorted(host.log) == [("map", 0, 0xF0000000), ("map", 1, 0xC000)]
    fn.write(0x04, 2, 0x1)
    assert host.log[-1] == ("unmap", 0, 0xF0000000)
    fn.write(0x00, 4, 0)  # ids are read-only
    assert fn.read(0, 4) == 0x100E8086


def test_pci_intx_edges_and_disable() -> None:
    fn = PciFunction(1, 2, 3)
    fn.host = host = RecordingPciHost()
    fn.set_irq(True)
    fn.set_irq(True)
    assert host.log == [("intx", True)] and fn.read(0x06, 2) & 0x8
    fn.write(0x04, 2, 0x400)  # INTx disable: the line drops for the guest
    fn.set_irq(False)
    fn.write(0x04, 2, 0)
    assert host.log == [("intx", True), ("intx", False)]


def test_pci_msi_only_when_enabled() -> None:
    fn = PciFunction(1, 2, 3, msi=True)
    fn.host = host = RecordingPciHost()
    assert fn.read(0x34, 1) == 0x40 and fn.read(0x40, 1) == 5
    assert not fn.notify_msi()
    fn.write(0x44, 4, 0xFEE01000)
    fn.write(0x4C, 2, 0x41)
    fn.write(0x42, 2, 1)
    assert fn.notify_msi() and host.log == [("msi", 0xFEE01000, 0x41)]
