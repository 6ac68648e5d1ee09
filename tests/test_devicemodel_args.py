"""DeviceModel refuses bad arguments before any syscall, and splits bulk calls to the kernel's limits."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import pytest

from xendmop import ArgumentError, ClosedHandleError, DeviceModel, Limits, XenError
from xendmop.abi.dm_op import xen_dm_op
from xendmop.abi.privcmd import IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_RESTRICT, privcmd_dm_op, privcmd_dm_op_buf
from xendmop.backends import Backend, PrivcmdBackend


class RecordingPrivcmd:
    """Answers every DM_OP with 0 and records (dom, [buffer sizes], op number)."""

    path = "/dev/xen/privcmd"

    def __init__(self, fill: int | None = None) -> None:
        self.calls: list[tuple[int, list[int], int]] = []
        self.restricts: list[int] = []
        self.fill = fill

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        if request == IOCTL_PRIVCMD_RESTRICT:
            self.restricts.append(arg.value)
            return 0
        assert request == IOCTL_PRIVCMD_DM_OP
        req = privcmd_dm_op.from_buffer_copy(arg)
        if req.num == 0:
            return 0  # the open-time probe
        bufs = (privcmd_dm_op_buf * req.num).from_address(req.ubufs)
        op = xen_dm_op.from_address(bufs[0].uptr)
        if self.fill is not None and req.num == 2:
            ctypes.memset(bufs[1].uptr, self.fill + len(self.calls), bufs[1].size)
        self.calls.append((req.dom, [b.size for b in bufs], op.op))
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def _open(device: RecordingPrivcmd, limits: Limits | None = None) -> DeviceModel:
    def opener(path: str) -> Any:
        if path == device.path:
            return device
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    return DeviceModel(PrivcmdBackend(opener, limits or Limits()))


BAD_CALLS = [
    ("set_isa_irq_level", (1, 256, 1), "irq"),
    ("set_isa_irq_level", (1, 3, 2), "level"),
    ("set_pci_intx_level", (1, 0, 0, 0x20, 0, 1), "device"),
    ("set_pci_intx_level", (1, 0, 0, 1, 4, 1), "intx"),
    ("map_pcidev_to_ioreq_server", (1, 0, 0, 0, 32, 0), "device"),
    ("map_pcidev_to_ioreq_server", (1, 0, 0, 0, 1, 8), "function"),
    ("map_pcidev_to_ioreq_server", (1, 0, 0x10000, 0, 1, 0), "segment"),
    ("map_io_range_to_ioreq_server", (1, 0x10000, False, 0, 1), "id"),
    ("map_io_range_to_ioreq_server", (1, 0, 2, 0, 1), "is_mmio"),
    ("map_io_range_to_ioreq_server", (1, 0, True, -1, 1), "start"),
    ("map_io_range_to_ioreq_server", (1, 0, True, 0, 2**64), "end"),
    ("create_ioreq_server", (1, 3), "handle_bufioreq"),
    ("set_pci_link_route", (1, 4, 5), "link"),
    ("inject_msi", (1, 2**64, 0), "msi_addr"),
    ("inject_event", (1, 2**32, 14, 3, 0, 0, 0), "vcpu"),
    ("set_mem_type", (1, 0, 0, 2**32), "nr"),
    ("map_mem_type_to_ioreq_server", (1, 0, 1, 2), "type"),
    ("map_mem_type_to_ioreq_server", (1, 0, 4, 1), "flags"),
    ("track_dirty_vram", (1, 2**64, 1), "first_pfn"),
    ("modified_memory", (1, 0, 2**32), "nr"),
    ("nr_vcpus", (0x10000,), "domid"),
    ("nr_vcpus", (-1,), "domid"),
]


@pytest.mark.parametrize(("method", "args", "name"), BAD_CALLS, ids=[f"{m}-{n}" for m, _, n in BAD_CALLS])
def test_bad_argument_never_reaches_the_kernel(method: str, args: tuple[Any, ...], name: str) -> None:
    device = RecordingPrivcmd()
    with _open(device) as dm, pytest.raises(ArgumentError) as info:
        getattr(dm, method)(*args)
    assert info.value.name.startswith(name) or name in str(info.value)
    assert device.calls == []


def test_wrong_types_are_type_errors() -> None:
    device = RecordingPrivcmd()
    with _open(device) as dm:
        with pytest.raises(TypeError):
            dm.set_isa_irq_level(1, "3", 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            dm.nr_vcpus(1.0)  # type: ignore[arg-type]
    assert device.calls == []


def test_restricted_handle_refuses_other_domains_before_the_kernel() -> None:
    device = RecordingPrivcmd()
    with _open(device) as dm:
        dm.restrict(5)
        assert device.restricts == [5]
        dm.set_isa_irq_level(5, 3, 1)
        with pytest.raises(PermissionError) as info:
            dm.set_isa_irq_level(6, 3, 1)
    assert isinstance(info.value, XenError) and info.value.op == "set_isa_irq_level" and info.value.domid == 6
    assert [c[0] for c in device.calls] == [5]


def test_restrict_refuses_reserved_domids() -> None:
    with _open(RecordingPrivcmd()) as dm, pytest.raises(ArgumentError):
        dm.restrict(0x7FF4)


def test_closed_handle() -> None:
    dm = _open(RecordingPrivcmd())
    dm.close()
    with pytest.raises(ClosedHandleError):
        dm.nr_vcpus(1)


def test_modified_memory_bulk_is_split_to_the_buffer_limit() -> None:
    device = RecordingPrivcmd()
    with _open(device) as dm:
        dm.modified_memory_bulk(1, [(pfn, 1) for pfn in range(600)])
    assert [sizes for _, sizes, _ in device.calls] == [[32, 4096], [32, 4096], [32, 88 * 16]]


def test_limits_follow_a_larger_kernel_parameter() -> None:
    device = RecordingPrivcmd()
    with _open(device, Limits(max_buf_size=8192)) as dm:
        dm.modified_memory_bulk(1, [(pfn, 1) for pfn in range(600)])
    assert [sizes[1] for _, sizes, _ in device.calls] == [8192, 88 * 16]


def test_track_dirty_vram_split_reassembles_the_bitmap() -> None:
    device = RecordingPrivcmd(fill=0x10)
    with _open(device) as dm:
        bitmap = dm.track_dirty_vram(1, 0x1000, 32768 * 2 + 9)
    assert [sizes for _, sizes, _ in device.calls] == [[32, 4096], [32, 4096], [32, 2]]
    assert bitmap == b"\x10" * 4096 + b"\x11" * 4096 + b"\x12" * 2


def test_modified_memory_bulk_takes_a_ctypes_array_without_copying_per_extent() -> None:
    from xendmop.abi.dm_op import xen_dm_op_modified_memory_extent as extent

    array = (extent * 3)()
    for i in range(3):
        array[i].first_pfn, array[i].nr = 0x100 + i, 1
    device = RecordingPrivcmd()
    with _open(device) as dm:
        dm.modified_memory_bulk(2, array)
        with pytest.raises(ArgumentError):
            dm.modified_memory_bulk(2, b"\0" * 17)
    assert device.calls == [(2, [32, 48], 11)]


def test_mock_backend_closes_the_host_it_made() -> None:
    import gc

    DeviceModel.open("mock").close()  # first-use caches
    gc.collect()  # earlier tests' garbage must not be counted
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        DeviceModel.open("mock").close()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds


class AnsweringBackend(Backend):
    """A backend with the generic ``compile_call`` (as LibxenBackend): ``dm_op`` answers an OUT slot
    with new bytes, and keeps what each call was given."""

    name = "answering"
    limits = Limits()

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict[str, int], list[Any]]] = []

    def dm_op(self, decl: Any, domid: int, fields: Any, slot_data: Any = ()) -> tuple[Any, list[bytes]]:
        self.calls.append((decl.name, domid, dict(fields), list(slot_data)))
        if decl.name == "track_dirty_vram":
            return None, [bytes(range(1, 1 + (fields["nr"] + 7) // 8))]
        return None, []

    def restrict(self, domid: int) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_generic_backend_fills_out_with_its_answer() -> None:
    backend = AnsweringBackend()
    dm = DeviceModel(backend)
    out = bytearray(b"\xee" * 16)
    assert dm.track_dirty_vram(1, 0x100, 100, out=out) is out
    assert out == bytes(range(1, 14)) + b"\xee" * 3
    assert backend.calls[0][3] == [None]  # the backend was asked for bytes, as before
    assert dm.track_dirty_vram(1, 0x100, 100) == bytes(range(1, 14))


def test_generic_backend_refuses_a_bad_out_before_calling() -> None:
    backend = AnsweringBackend()
    dm = DeviceModel(backend)
    with pytest.raises(TypeError, match=r"out.*EFAULT"):
        dm.track_dirty_vram(1, 0x100, 100, out=bytes(13))
    with pytest.raises(ArgumentError, match="out=12"):
        dm.track_dirty_vram(1, 0x100, 100, out=bytearray(12))
    assert backend.calls == []


def test_generic_backend_takes_packed_extents() -> None:
    from xendmop.abi.dm_op import xen_dm_op_modified_memory_extent as extent

    backend = AnsweringBackend()
    dm = DeviceModel(backend)
    array = (extent * 2)()
    array[1].first_pfn, array[1].nr = 0x40, 3
    dm.modified_memory_bulk(1, array)
    ((name, domid, fields, (data,)),) = backend.calls
    assert (name, domid, fields) == ("modified_memory", 1, {"nr_extents": 2})
    assert bytes(memoryview(data).cast("B")) == bytes(array)
