"""The per-op calls generated from the declarations (``PrivcmdBackend.compile_call``) send
exactly what the generic ``dm_op`` sends, and keep its checks, errors and guarantees."""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import os
from typing import Any

import pytest

from xendmop import ArgumentError, ClosedHandleError, DeviceModel, Limits
from xendmop.abi.privcmd import (
    IOCTL_PRIVCMD_DM_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    IOCTL_PRIVCMD_RESTRICT,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_hypercall,
)
from xendmop.backends import PrivcmdBackend
from xendmop.ops import BY_NAME, CTYPES_MEMORY, caller_memory


class CapturingPrivcmd:
    """Answers every DM_OP with 0 and keeps the bytes of every buffer; can write an OUT slot."""

    path = "/dev/xen/privcmd"

    def __init__(self) -> None:
        self.requests: list[tuple[int, list[bytes]]] = []
        self.slot_bufs: list[tuple[int, int]] = []  # bufs[1] as (uptr, size)
        self.answer: bytes | None = None  # written into bufs[1] when set

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        if request == IOCTL_PRIVCMD_RESTRICT:
            return 0
        assert request == IOCTL_PRIVCMD_DM_OP
        req = privcmd_dm_op.from_buffer_copy(arg)
        if req.num == 0:
            return 0
        bufs = (privcmd_dm_op_buf * req.num).from_address(req.ubufs)
        if self.answer is not None and req.num == 2:
            ctypes.memmove(bufs[1].uptr, self.answer, min(len(self.answer), bufs[1].size))
        self.requests.append((req.dom, [ctypes.string_at(b.uptr, b.size) for b in bufs]))
        if req.num == 2:
            self.slot_bufs.append((bufs[1].uptr, bufs[1].size))
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def _open(device: CapturingPrivcmd) -> DeviceModel:
    def opener(path: str) -> Any:
        if path == device.path:
            return device
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    return DeviceModel(PrivcmdBackend(opener, Limits()))


EXTENTS = (BY_NAME["modified_memory"].slots[0].ctype * 3)()
for _i in range(3):
    EXTENTS[_i].first_pfn, EXTENTS[_i].nr = 0x100 * (_i + 1), _i + 1

# (method call, the same request through the generic funnel: op, fields, slot data)
SAME_REQUESTS = [
    (("create_ioreq_server", 3, 1), ("create_ioreq_server", {"handle_bufioreq": 1}, ())),
    (("get_ioreq_server_info", 3, 2), ("get_ioreq_server_info", {"id": 2, "flags": 1}, ())),
    (
        ("map_io_range_to_ioreq_server", 3, 2, True, 0xFEB00000, 0xFEB00FFF),
        ("map_io_range_to_ioreq_server", {"id": 2, "type": 1, "start": 0xFEB00000, "end": 0xFEB00FFF}, ()),
    ),
    (
        ("unmap_pcidev_from_ioreq_server", 3, 2, 0, 1, 3, 5),
        ("unmap_io_range_from_ioreq_server", {"id": 2, "type": 2, "start": 0x11D, "end": 0x11D}, ()),
    ),
    (("set_ioreq_server_state", 3, 2, True), ("set_ioreq_server_state", {"id": 2, "enabled": 1}, ())),
    (("destroy_ioreq_server", 3, 2), ("destroy_ioreq_server", {"id": 2}, ())),
    (
        ("set_pci_intx_level", 3, 0, 1, 4, 2, 1),
        ("set_pci_intx_level", {"domain": 0, "bus": 1, "device": 4, "intx": 2, "level": 1}, ()),
    ),
    (("set_isa_irq_level", 3, 11, 1), ("set_isa_irq_level", {"isa_irq": 11, "level": 1}, ())),
    (("set_pci_link_route", 3, 2, 10), ("set_pci_link_route", {"link": 2, "isa_irq": 10}, ())),
    (("inject_msi", 3, 0xFEE00000, 0x4041), ("inject_msi", {"addr": 0xFEE00000, "data": 0x4041}, ())),
    (
        ("inject_event", 3, 1, 14, 3, 2, 0, 0xDEAD000),
        (
            "inject_event",
            {"vcpuid": 1, "vector": 14, "type": 3, "error_code": 2, "insn_len": 0, "cr2": 0xDEAD000},
            (),
        ),
    ),
    (("track_dirty_vram", 3, 0xF0000, 77), ("track_dirty_vram", {"first_pfn": 0xF0000, "nr": 77}, (None,))),
    (("modified_memory_bulk", 3, EXTENTS), ("modified_memory", {"nr_extents": 3}, (memoryview(EXTENTS).cast("B"),))),
    (("set_mem_type", 3, 1, 0x1000, 16), ("set_mem_type", {"mem_type": 1, "first_pfn": 0x1000, "nr": 16}, ())),
    (("relocate_memory", 3, 4, 0x10, 0x20), ("relocate_memory", {"size": 4, "src_gfn": 0x10, "dst_gfn": 0x20}, ())),
    (("pin_memory_cacheattr", 3, 0x10, 0x1F, 6), ("pin_memory_cacheattr", {"start": 0x10, "end": 0x1F, "type": 6}, ())),
    (("shutdown", 3, 2), ("remote_shutdown", {"reason": 2}, ())),
    (("nr_vcpus", 3), ("nr_vcpus", {}, ())),
]


@pytest.mark.parametrize("method, generic", SAME_REQUESTS, ids=[m[0] for m, _ in SAME_REQUESTS])
def test_generated_call_sends_the_generic_bytes(method: tuple[Any, ...], generic: tuple[Any, ...]) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    name, *args = method
    op, fields, slots = generic
    getattr(dm, name)(*args)  # the op's call, made when the handle opened
    dm._call(BY_NAME[op], args[0], fields, slots)  # the generic funnel, same arena pool
    getattr(dm, name)(*args)  # compiled, after the generic path has used the arena
    assert len(device.requests) == 3
    assert device.requests[0] == device.requests[1] == device.requests[2]


def test_out_slot_is_cleared_before_each_call() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    device.answer = b"\xa5" * 16
    assert dm.track_dirty_vram(3, 0x100, 128) == b"\xa5" * 16
    device.answer = None  # a call that writes nothing must not return the last answer
    assert dm.track_dirty_vram(3, 0x100, 128) == bytes(16)


def test_split_bitmap_is_reassembled_in_order() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    per_call = 8 * 4096
    device.answer = b"\x0f" * 4096
    bitmap = dm.track_dirty_vram(3, 0x100000, 2 * per_call + 9)
    assert len(bitmap) == (2 * per_call + 9 + 7) // 8
    assert bitmap == b"\x0f" * (2 * 4096 + 2)
    assert [len(bufs[1]) for _, bufs in device.requests] == [4096, 4096, 2]
    (first, _), *rest = device.slot_bufs  # Xen writes each chunk in place, one buffer after the other
    assert [addr for addr, _ in rest] == [first + 4096, first + 8192]
    assert not any(first in arena for arena in _arena_ranges(dm))


def test_a_refused_chunk_of_a_split_bitmap_raises_its_own_error() -> None:
    class RefusesTheSecond(CapturingPrivcmd):
        def ioctl(self, request: int, arg: Any) -> int:
            if len(self.requests) == 1:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return super().ioctl(request, arg)

    dm = _open(RefusesTheSecond())
    with pytest.raises(OSError) as info:  # the XenError, from the chunk that failed
        dm.track_dirty_vram(3, 0x100000, 3 * 8 * 4096)
    assert info.value.errno == errno.EINVAL and "track_dirty_vram" in str(info.value)


def test_restrict_after_first_use_still_applies() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    dm.set_isa_irq_level(3, 4, 1)
    dm.restrict(3)
    with pytest.raises(PermissionError, match="domid=4"):
        dm.set_isa_irq_level(4, 4, 1)
    assert [dom for dom, _ in device.requests] == [3]


def test_closed_handle_refuses_a_compiled_call() -> None:
    dm = _open(CapturingPrivcmd())
    dm.set_isa_irq_level(3, 4, 1)
    dm.close()
    with pytest.raises(ClosedHandleError):
        dm.set_isa_irq_level(3, 4, 1)


class Level(enum.IntEnum):
    LOW = 0
    HIGH = 1


def test_bool_and_intenum_go_through_the_full_check() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    dm.set_isa_irq_level(3, 4, True)
    dm.set_isa_irq_level(3, 4, Level.HIGH)
    dm.set_isa_irq_level(3, 4, 1)
    assert device.requests[0] == device.requests[1] == device.requests[2]


@pytest.mark.parametrize(
    "args, exc, field",
    [
        ((3, 4, 1.0), TypeError, "level"),  # no silent int(): 1.7 would have become 1
        ((3, 4.0, 1), TypeError, ": irq must be an int"),  # the argument's name, not the C field isa_irq
        ((True, 4, 1), TypeError, "domid"),
        ((0x10000, 4, 1), ArgumentError, "domid"),
        ((3, 256, 1), ArgumentError, ": irq=256"),
        ((3, 4, 2), ArgumentError, "level"),
    ],
)
def test_generated_call_raises_the_typed_errors(args: tuple[Any, ...], exc: type[Exception], field: str) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    with pytest.raises(exc, match=field):
        dm.set_isa_irq_level(*args)
    assert device.requests == []


def test_extents_of_the_wrong_size_are_refused_by_name() -> None:
    dm = _open(CapturingPrivcmd())
    with pytest.raises(ArgumentError, match="extents"):
        dm._calls.modified_memory(3, 2, memoryview(EXTENTS).cast("B"))  # three extents, two declared


def test_an_empty_slot_is_never_page_aligned() -> None:
    """privcmd pins the pages a buffer spans: an aligned 0-byte one spans none (EFAULT, or
    worse, on Linux 6.1), so both paths point it inside the slot page instead."""
    device = CapturingPrivcmd()
    dm = _open(device)
    dm.track_dirty_vram(3, 0x100, 0)  # stop tracking: an empty bitmap
    dm._call(BY_NAME["track_dirty_vram"], 3, {"first_pfn": 0x100, "nr": 0}, (None,))
    dm.track_dirty_vram(3, 0x100, 8)
    (empty, _), (generic_empty, _), (full, _) = device.slot_bufs
    assert [size for _, size in device.slot_bufs] == [0, 0, 1]
    assert empty % mmap.PAGESIZE and generic_empty % mmap.PAGESIZE
    assert full % mmap.PAGESIZE == 0 and empty // mmap.PAGESIZE == full // mmap.PAGESIZE


# --- zero-copy forms: the caller's memory handed to the DM_OP ioctl as it is ---------------


def _address(buffer: Any) -> int:
    if isinstance(buffer, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(buffer)
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _arena_ranges(dm: DeviceModel) -> list[range]:
    return [range(a.base, a.base + len(a.view)) for a in dm.backend._buffers._all]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "make_out",
    [
        lambda: (ctypes.c_ulong * 2)(),
        lambda: bytearray(16),
        lambda: memoryview(bytearray(20))[4:],
        lambda: (ctypes.c_uint8 * 13)(),
    ],
    ids=["c_ulong array", "bytearray", "memoryview slice", "exactly 13 bytes"],
)
def test_track_dirty_vram_writes_into_out_in_place(make_out: Any) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    device.answer = bytes(range(1, 14))
    out = make_out()
    assert dm.track_dirty_vram(3, 0xF0000, 100, out=out) is out
    assert device.slot_bufs == [(_address(out), 13)]  # Xen was pointed at it, 13 bytes as libxendevicemodel says
    assert bytes(out)[:13] == bytes(range(1, 14))
    assert dm.track_dirty_vram(3, 0xF0000, 100) == bytes(range(1, 14))  # the bytes form is unchanged
    assert device.requests[0] == device.requests[1]  # same op, same (zero) bitmap bytes sent


def test_track_dirty_vram_out_is_handed_over_as_it_is() -> None:
    """Not zeroed first: libxendevicemodel hands the caller's bitmap over untouched, and Xen
    writes the whole of it on success (the golden test compares the two)."""
    device = CapturingPrivcmd()
    dm = _open(device)
    out = bytearray(b"\x5a" * 13)
    dm.track_dirty_vram(3, 0xF0000, 100, out=out)
    assert device.requests[0][1][1] == b"\x5a" * 13
    assert out == b"\x5a" * 13  # the capturing device wrote nothing


@pytest.mark.parametrize(
    "out, exc, words",
    [
        (b"\0" * 13, TypeError, ("out", "read-only", "EFAULT")),
        (memoryview(bytearray(13)).toreadonly(), TypeError, ("out", "read-only", "EFAULT")),
        (memoryview(bytearray(26))[::2], TypeError, ("out", "C-contiguous")),
        (ctypes.pointer((ctypes.c_ulong * 2)()), TypeError, ("out", "pointer")),
        (13, TypeError, ("out", "buffer")),
        (bytearray(12), ArgumentError, ("out=12", "at least 13 bytes")),
        ((ctypes.c_ulong * 1)(), ArgumentError, ("out=8", "at least 13 bytes")),
    ],
    ids=["bytes", "read-only view", "strided view", "ctypes pointer", "int", "short bytearray", "short ctypes"],
)
def test_bad_out_is_refused_before_the_kernel(out: Any, exc: type[Exception], words: tuple[str, ...]) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    with pytest.raises(exc) as info:
        dm.track_dirty_vram(3, 0xF0000, 100, out=out)
    for word in words:
        assert word in str(info.value)
    if exc is ArgumentError:
        assert info.value.name == "out"  # type: ignore[attr-defined]
    assert device.requests == []


def test_empty_out_is_never_sent_page_aligned() -> None:
    """nr 0 (stop tracking) with a page-aligned out: the 0-byte buffer still points inside the
    arena's slot page, never at the caller's aligned address (HAZARD 2, integration/scenarios.py)."""
    device = CapturingPrivcmd()
    dm = _open(device)
    page = mmap.mmap(-1, mmap.PAGESIZE)
    out = (ctypes.c_char * mmap.PAGESIZE).from_buffer(page)
    assert ctypes.addressof(out) % mmap.PAGESIZE == 0
    assert dm.track_dirty_vram(3, 0x100, 0, out=out) is out
    ((empty, size),) = device.slot_bufs
    assert size == 0 and empty % mmap.PAGESIZE and empty != ctypes.addressof(out)
    assert any(empty in arena for arena in _arena_ranges(dm))
    del out
    page.close()


def test_split_track_dirty_vram_fills_each_slice_of_out_in_place() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    per_call = 8 * 4096
    device.answer = b"\x0f" * 4096
    out = bytearray(b"\xff" * ((2 * per_call + 9 + 7) // 8 + 3))  # larger than needed: the tail is left alone
    assert dm.track_dirty_vram(3, 0x100000, 2 * per_call + 9, out=out) is out
    base = _address(out)
    assert device.slot_bufs == [(base, 4096), (base + 4096, 4096), (base + 8192, 2)]
    assert out == b"\x0f" * (2 * 4096 + 2) + b"\xff" * 3


def test_split_track_dirty_vram_checks_out_before_any_call() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    with pytest.raises(ArgumentError, match="out"):
        dm.track_dirty_vram(3, 0x100000, 3 * 8 * 4096, out=bytearray(3 * 4096 - 1))
    assert device.requests == []


def _packed(n: int) -> Any:
    array = (BY_NAME["modified_memory"].slots[0].ctype * n)()
    for i in range(n):
        array[i].first_pfn, array[i].nr = 0x1000 + 8 * i, 1 + i % 5
    return array


def test_packed_extents_in_writable_memory_are_pointed_at() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    array = _packed(3)
    as_bytearray = bytearray(array)
    dm.modified_memory_bulk(3, array)
    dm.modified_memory_bulk(3, array)  # a second time: the class's check is remembered
    dm.modified_memory_bulk(3, as_bytearray)
    dm.modified_memory_bulk(3, [(0x1000 + 8 * i, 1 + i % 5) for i in range(3)])
    assert device.slot_bufs[:3] == [(ctypes.addressof(array), 48)] * 2 + [(_address(as_bytearray), 48)]
    assert len({tuple(bufs) for _, bufs in device.requests}) == 1  # the same bytes, whatever the form


def test_read_only_extents_are_copied_into_the_arena() -> None:
    """privcmd pins every buffer for writing (FOLL_WRITE): bytes go through the hypercall buffer."""
    device = CapturingPrivcmd()
    dm = _open(device)
    data = bytes(_packed(3))
    dm.modified_memory_bulk(3, data)
    ((addr, size),) = device.slot_bufs
    assert size == 48 and any(addr in arena for arena in _arena_ranges(dm))
    assert device.requests[0][1][1] == data


def test_split_extents_in_writable_memory_are_pointed_at_chunk_by_chunk() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    array = _packed(300)
    as_bytearray = bytearray(array)
    dm.modified_memory_bulk(3, array)
    dm.modified_memory_bulk(3, as_bytearray)
    base = ctypes.addressof(array)
    assert device.slot_bufs[:2] == [(base, 4096), (base + 4096, 44 * 16)]
    assert device.slot_bufs[2:] == [(_address(as_bytearray), 4096), (_address(as_bytearray) + 4096, 44 * 16)]
    assert b"".join(bufs[1] for _, bufs in device.requests[:2]) == bytes(array)
    assert device.requests[:2] == device.requests[2:]


def test_split_read_only_extents_are_copied_chunk_by_chunk() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    data = bytes(_packed(300))
    dm.modified_memory_bulk(3, data)
    assert [size for _, size in device.slot_bufs] == [4096, 44 * 16]
    assert all(any(addr in arena for arena in _arena_ranges(dm)) for addr, _ in device.slot_bufs)
    assert b"".join(bufs[1] for _, bufs in device.requests) == data


def test_extents_with_a_wider_item_are_taken_as_bytes() -> None:
    import array as pyarray

    device = CapturingPrivcmd()
    dm = _open(device)
    words = pyarray.array("Q", bytes(_packed(3)))
    dm.modified_memory_bulk(3, words)
    assert device.slot_bufs == [(words.buffer_info()[0], 48)]
    assert device.requests[0][1][1] == bytes(_packed(3))


@pytest.mark.parametrize(
    "extents, words",
    [
        (memoryview(bytearray(96))[::2], ("extents", "C-contiguous")),
        (bytearray(40), ("extents=40", "multiple of 16")),
        ([(1, 2), (3,)], ("extents[1]", "pair")),
        ([(1, 2), (3, -1)], ("extents[1].nr", "out of range")),
    ],
    ids=["strided", "not a multiple", "not a pair", "negative nr"],
)
def test_bad_extents_are_refused_by_name(extents: Any, words: tuple[str, ...]) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    with pytest.raises(ArgumentError) as info:
        dm.modified_memory_bulk(3, extents)
    for word in words:
        assert word in str(info.value)
    assert device.requests == []


def test_extents_with_an_item_size_that_does_not_divide_16_are_refused() -> None:
    class Twelve(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32)]

    device = CapturingPrivcmd()
    dm = _open(device)
    with pytest.raises(ArgumentError, match="item size 12"):
        dm.modified_memory_bulk(3, memoryview((Twelve * 4)()))
    assert device.requests == []


class HypercallPrivcmd:
    """A kernel without IOCTL_PRIVCMD_DM_OP (ENOTTY): DMOPs come as IOCTL_PRIVCMD_HYPERCALL.
    Keeps each call's buffers (address, bytes) and can write an answer into bufs[1]."""

    path = "/dev/xen/privcmd"

    def __init__(self) -> None:
        self.bufs: list[list[tuple[int, bytes]]] = []
        self.answer: bytes | None = None

    def fileno(self) -> int:
        return -1

    def ioctl(self, request: int, arg: Any) -> int:
        if request == IOCTL_PRIVCMD_DM_OP:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        assert request == IOCTL_PRIVCMD_HYPERCALL
        call = privcmd_hypercall.from_buffer_copy(arg)
        bufs = (privcmd_dm_op_buf * call.arg[1]).from_address(call.arg[2])  # same layout as xen_dm_op_buf
        self.bufs.append([(b.uptr, ctypes.string_at(b.uptr, b.size)) for b in bufs])
        if self.answer is not None and call.arg[1] == 2:
            ctypes.memmove(bufs[1].uptr, self.answer, min(len(self.answer), bufs[1].size))
        return 0

    def mmap(self, length: int, offset: int = 0) -> Any:
        raise OSError(errno.ENODEV, "no mmap")

    def close(self) -> None:
        pass


def test_hypercall_fallback_copies_the_zero_copy_forms_through_hypercall_buffers() -> None:
    """IOCTL_PRIVCMD_HYPERCALL hands Xen the pointers themselves: only the hypercall
    allocator's memory will do, so the caller's buffers are copied in (and the bitmap out)."""
    device = HypercallPrivcmd()
    dm = _open(device)  # type: ignore[arg-type]
    assert dm.backend.uses_hypercall  # type: ignore[attr-defined]
    device.answer = bytes(range(1, 14))
    out = (ctypes.c_uint8 * 16)(*([0x5A] * 16))
    assert dm.track_dirty_vram(3, 0xF0000, 100, out=out) is out
    extents = _packed(3)
    dm.modified_memory_bulk(3, extents)
    dm.modified_memory_bulk(3, bytearray(extents))
    arenas = _arena_ranges(dm)
    for bufs in device.bufs:
        assert all(any(addr in arena for arena in arenas) for addr, _ in bufs)
    assert device.bufs[0][1][1] == b"\x5a" * 13  # the bounce starts as the caller's bytes
    assert bytes(out) == bytes(range(1, 14)) + b"\x5a" * 3  # the answer copied back, 13 bytes only
    assert device.bufs[1][1][1] == device.bufs[2][1][1] == bytes(extents)


# --- entries: the bulk methods' common form as the generated call itself -----------------

ENTRIES = ("track_dirty_vram", "modified_memory_bulk", "set_isa_irq_level", "set_pci_intx_level", "set_irq_level")
_GENERAL = {name: getattr(DeviceModel, name) for name in (*ENTRIES, "inject_msi")}


def _record(dm: DeviceModel, device: CapturingPrivcmd, call: Any) -> tuple[Any, Any, Any]:
    """What one call returned or raised, and the requests it sent (bytes and bufs[1] sizes)."""
    before = len(device.requests)
    try:
        result: Any = ("returned", call())
    except Exception as e:  # the comparison is of the error itself
        result = ("raised", type(e), str(e))
    sent = device.requests[before:]
    return result, sent, [size for _, size in device.slot_bufs[-len(sent) :]] if sent else []


def _is_entry(function: Any, name: str) -> bool:
    """Is ``function`` the method ``name``'s entry, from the checked-in generated module (a file a
    traceback shows), not the method?"""
    from xendmop.backends import privcmd_calls

    return bool(function.__code__.co_filename == privcmd_calls.__file__ and function.__code__.co_name == name)


def test_bulk_and_interrupt_methods_become_generated_entries_on_the_dm_op_path() -> None:
    dm = _open(CapturingPrivcmd())
    for name, general in _GENERAL.items():
        entry = getattr(dm, name)
        assert dm.__dict__[name] is entry  # the handle's own attribute: no method frame around it
        assert _is_entry(entry, name)
        assert entry.__doc__ == general.__doc__
    import inspect

    assert str(inspect.signature(dm.track_dirty_vram)) == "(domid, first_pfn, nr, out=None)"
    for name in _GENERAL:  # the method's own argument names: keyword callers see no difference
        wanted = [p for p in inspect.signature(_GENERAL[name]).parameters if p != "self"]
        assert list(inspect.signature(getattr(dm, name)).parameters) == wanted
    hypercall = _open(HypercallPrivcmd())  # type: ignore[arg-type]
    assert hypercall.track_dirty_vram.__func__ is _GENERAL["track_dirty_vram"]  # type: ignore[attr-defined]
    assert "track_dirty_vram" not in hypercall.__dict__


class Pages(enum.IntEnum):
    SOME = 77


TRACK_FORMS = [
    (3, 0x100, 77),
    (3, 0x100, Pages.SOME),  # an IntEnum: the general path's full check lets it through
    (3, 0x100, 0),  # stop tracking: the empty bitmap is never page-aligned
    (3, 0x100, 8 * 4096),  # exactly one kernel-sized buffer
    (3, 0x100, 8 * 4096 + 1),  # split
    (3, 2**64 - 1, 1),
    (3, 2**64, 1),
    (3, 0x100, -1),
    (0x10000, 0x100, 1),
    (True, 0x100, 1),
    (3, 0x100, 1.0),
]


@pytest.mark.parametrize("args", TRACK_FORMS, ids=[repr(a) for a in TRACK_FORMS])
@pytest.mark.parametrize(
    "make_out",
    [
        lambda: None,
        lambda: (ctypes.c_ulong * 520)(),
        lambda: bytearray(4200),
        lambda: (ctypes.c_uint8 * 5)(),  # too short for most forms
        lambda: b"\0" * 4200,  # read-only
    ],
    ids=["None", "ctypes", "bytearray", "short", "bytes"],
)
def test_track_dirty_vram_entry_does_what_the_method_does(args: tuple[Any, ...], make_out: Any) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    device.answer = bytes(range(256)) * 16
    out_entry, out_general = make_out(), make_out()
    by_entry = _record(dm, device, lambda: dm.track_dirty_vram(*args, out=out_entry))
    by_method = _record(dm, device, lambda: _GENERAL["track_dirty_vram"](dm, *args, out_general))
    assert _is_entry(dm.__dict__["track_dirty_vram"], "track_dirty_vram")
    if by_entry[0][0] == "returned" and out_entry is not None:  # the caller's buffer, returned and filled
        assert by_entry[0][1] is out_entry and by_method[0][1] is out_general
        assert bytes(out_entry) == bytes(out_general)
        by_entry, by_method = by_entry[1:], by_method[1:]
    assert by_entry == by_method


EXTENT_FORMS = {
    "ctypes array": lambda: _packed(3),
    "one extent (a Structure)": lambda: _packed(1)[0],
    "bytes as c_char": lambda: (ctypes.c_char * 48).from_buffer_copy(bytes(_packed(3))),
    "empty array": lambda: _packed(0),
    "17 bytes": lambda: (ctypes.c_char * 17)(),
    "one call exactly": lambda: _packed(256),
    "split": lambda: _packed(257),
    "pairs": lambda: [(0x100, 1), (0x300, 2)],
    "bytearray": lambda: bytearray(_packed(2)),
    "bytes": lambda: bytes(_packed(2)),
}


@pytest.mark.parametrize("make", EXTENT_FORMS.values(), ids=list(EXTENT_FORMS))
@pytest.mark.parametrize("domid", [3, 0x10000, True])
def test_modified_memory_bulk_entry_does_what_the_method_does(make: Any, domid: Any) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    extents = make()
    if isinstance(extents, CTYPES_MEMORY):  # its class met before (as any call with one would): the entry's form
        caller_memory("test", "extents", extents, writable=True)
    for _ in range(2):
        by_entry = _record(dm, device, lambda: dm.modified_memory_bulk(domid, extents))
        by_method = _record(dm, device, lambda: _GENERAL["modified_memory_bulk"](dm, domid, extents))
        assert by_entry == by_method


def test_entries_refuse_on_a_closed_or_restricted_handle() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    track, bulk, isa = dm.track_dirty_vram, dm.modified_memory_bulk, dm.set_isa_irq_level
    extents = _packed(2)
    bulk(3, extents)
    dm.restrict(3)
    for refused in (lambda: track(4, 0x100, 8), lambda: bulk(4, extents), lambda: isa(4, 11, 1)):
        with pytest.raises(PermissionError, match="domid=4"):
            refused()
    dm.close()
    assert not set(ENTRIES) & set(dm.__dict__)
    for call in (
        lambda: track(3, 0x100, 8),
        lambda: bulk(3, extents),
        lambda: isa(3, 11, 1),
        lambda: dm.track_dirty_vram(3, 0x100, 8),
        lambda: dm.set_isa_irq_level(3, 11, 1),
    ):
        with pytest.raises(ClosedHandleError):
            call()
    assert len(device.requests) == 1


def test_an_entry_keeps_no_reference_to_its_handle() -> None:
    import gc
    import weakref

    gc.disable()
    try:
        dm = _open(CapturingPrivcmd())
        dm.track_dirty_vram(3, 0x100, 8)
        bulk = dm.modified_memory_bulk
        handle = weakref.ref(dm)
        del dm
        assert handle() is None  # freed by reference counting: no cycle through the entry
        with pytest.raises(ClosedHandleError, match="gone"):
            bulk(3, [(0x100, 1)])  # the general path needs the handle
    finally:
        gc.enable()


INTERRUPT_FORMS = {
    "set_isa_irq_level": [(3, 11, 1), (3, 11, True), (3, 11, Level.HIGH), (3, 16, 1), (3, 11, 2), (3, 11, 1.0)],
    "set_pci_intx_level": [(3, 0, 1, 4, 2, 1), (3, 0, 1, 4, 4, 1), (3, 0x10000, 1, 4, 2, 1), (3, 0, 1, 0x20, 2, 0)],
    "set_irq_level": [(3, 40, 1), (3, 40, 2), (3, -1, 0)],
    "inject_msi": [(3, 0xFEE00000, 0x4041), (3, 2**64, 1), (3, 0xFEE00000, 2**32), (3, 0xFEE00000, "1")],
}


@pytest.mark.parametrize(
    "name, args", [(n, a) for n, forms in INTERRUPT_FORMS.items() for a in [*forms, (0x10000, *forms[0][1:])]]
)
def test_interrupt_entries_do_what_the_methods_do(name: str, args: tuple[Any, ...]) -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    by_entry = _record(dm, device, lambda: getattr(dm, name)(*args))
    by_method = _record(dm, device, lambda: _GENERAL[name](dm, *args))
    assert by_entry == by_method
    assert _is_entry(dm.__dict__[name], name)


def test_interrupt_entries_take_keywords_by_the_methods_names() -> None:
    device = CapturingPrivcmd()
    dm = _open(device)
    dm.set_isa_irq_level(domid=3, irq=11, level=1)
    dm.set_pci_intx_level(3, segment=0, bus=1, device=4, intx=2, level=1)
    dm.inject_msi(3, msi_addr=0xFEE00000, msi_data=0x4041)
    dm.set_isa_irq_level(3, 11, 1)
    dm.set_pci_intx_level(3, 0, 1, 4, 2, 1)
    dm.inject_msi(3, 0xFEE00000, 0x4041)
    assert device.requests[:3] == device.requests[3:]
