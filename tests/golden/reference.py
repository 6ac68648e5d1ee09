"""The reference: Xen's own libxendevicemodel, called through ctypes.

``CReference`` has a method per ``DeviceModel`` method, with the same arguments
and the same Python return value, written independently of xendmop (no import of
its backends or declarations): each calls the C function of the same name.  Where
xendmop splits a request to privcmd's limits (a buffer of at most 4096 bytes),
the reference issues the equivalent chunked C calls; libxendevicemodel itself
never splits.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_ulong, c_void_p
from typing import Any

SONAME = "libxendevicemodel.so.1"
KERNEL_BUF_MAX = 4096


class Extent(ctypes.Structure):
    """struct xen_dm_op_modified_memory_extent"""

    _fields_ = [("nr", c_uint32), ("pad", c_uint32), ("first_pfn", c_uint64)]


class CReference:
    def __init__(self, soname: str = SONAME) -> None:
        self._c = ctypes.CDLL(soname, use_errno=True)
        self._c.xendevicemodel_open.restype = c_void_p
        self._c.xendevicemodel_open.argtypes = [c_void_p, c_uint]
        handle = self._c.xendevicemodel_open(None, 0)
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"xendevicemodel_open: {os.strerror(err)}")
        self._h = c_void_p(handle)

    def _call(self, name: str, *args: Any) -> None:
        fn = getattr(self._c, f"xendevicemodel_{name}")
        fn.restype = c_int
        if fn(self._h, *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"xendevicemodel_{name}: {os.strerror(err)}")

    def close(self) -> None:
        self._c.xendevicemodel_close.argtypes = [c_void_p]
        self._c.xendevicemodel_close(self._h)

    def create_ioreq_server(self, domid: int, handle_bufioreq: int) -> int:
        id = c_uint16()
        self._call("create_ioreq_server", c_uint16(domid), c_int(handle_bufioreq), byref(id))
        return id.value

    def get_ioreq_server_info(self, domid: int, id: int, *, gfns: bool = False) -> tuple[Any, ...]:
        ioreq, bufioreq, port = c_uint64(), c_uint64(), c_uint32()  # xen_pfn_t is 64-bit on x86_64
        if gfns:
            self._call("get_ioreq_server_info", c_uint16(domid), c_uint16(id), byref(ioreq), byref(bufioreq),
                       byref(port))
            return (ioreq.value, bufioreq.value, port.value)
        self._call("get_ioreq_server_info", c_uint16(domid), c_uint16(id), None, None, byref(port))
        return (None, None, port.value)

    def map_io_range_to_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("map_io_range_to_ioreq_server", c_uint16(domid), c_uint16(id), c_int(is_mmio), c_uint64(start),
                   c_uint64(end))

    def unmap_io_range_from_ioreq_server(self, domid: int, id: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("unmap_io_range_from_ioreq_server", c_uint16(domid), c_uint16(id), c_int(is_mmio),
                   c_uint64(start), c_uint64(end))

    def map_pcidev_to_ioreq_server(self, domid: int, id: int, segment: int, bus: int, device: int,
                                   function: int) -> None:
        self._call("map_pcidev_to_ioreq_server", c_uint16(domid), c_uint16(id), c_uint16(segment), c_uint8(bus),
                   c_uint8(device), c_uint8(function))

    def unmap_pcidev_from_ioreq_server(self, domid: int, id: int, segment: int, bus: int, device: int,
                                       function: int) -> None:
        self._call("unmap_pcidev_from_ioreq_server", c_uint16(domid), c_uint16(id), c_uint16(segment),
                   c_uint8(bus), c_uint8(device), c_uint8(function))

    def map_mem_type_to_ioreq_server(self, domid: int, id: int, type: int, flags: int) -> None:
        self._call("map_mem_type_to_ioreq_server", c_uint16(domid), c_uint16(id), c_uint16(type), c_uint32(flags))

    def set_ioreq_server_state(self, domid: int, id: int, enabled: bool) -> None:
        self._call("set_ioreq_server_state", c_uint16(domid), c_uint16(id), c_int(enabled))

    def destroy_ioreq_server(self, domid: int, id: int) -> None:
        self._call("destroy_ioreq_server", c_uint16(domid), c_uint16(id))

    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int, intx: int, level: int) -> None:
        self._call("set_pci_intx_level", c_uint16(domid), c_uint16(segment), c_uint8(bus), c_uint8(device),
                   c_uint8(intx), c_uint(level))

    def set_isa_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._call("set_isa_irq_level", c_uint16(domid), c_uint8(irq), c_uint(level))

    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._call("set_irq_level", c_uint16(domid), c_uint(irq), c_uint(level))

    def set_pci_link_route(self, domid: int, link: int, irq: int) -> None:
        self._call("set_pci_link_route", c_uint16(domid), c_uint8(link), c_uint8(irq))

    def inject_msi(self, domid: int, msi_addr: int, msi_data: int) -> None:
        self._call("inject_msi", c_uint16(domid), c_uint64(msi_addr), c_uint32(msi_data))

    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes:
        per_call = 8 * KERNEL_BUF_MAX
        out = b""
        for done in range(0, nr, per_call) if nr else [0]:
            n = min(per_call, nr - done)
            words = (c_ulong * -(-n // (8 * ctypes.sizeof(c_ulong))))()
            self._call("track_dirty_vram", c_uint16(domid), c_uint64(first_pfn + done), c_uint32(n),
                       ctypes.cast(words, POINTER(c_ulong)))
            out += bytes(words)[: (n + 7) // 8]
        return out

    def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None:
        self._call("modified_memory", c_uint16(domid), c_uint64(first_pfn), c_uint32(nr))

    def modified_memory_bulk(self, domid: int, extents: list[tuple[int, int]]) -> None:
        per_call = KERNEL_BUF_MAX // ctypes.sizeof(Extent)
        for start in range(0, len(extents), per_call):
            chunk = extents[start : start + per_call]
            array = (Extent * len(chunk))(*(Extent(nr=nr, first_pfn=pfn) for pfn, nr in chunk))
            self._call("modified_memory_bulk", c_uint16(domid), array, c_uint32(len(chunk)))

    def set_mem_type(self, domid: int, mem_type: int, first_pfn: int, nr: int) -> None:
        self._call("set_mem_type", c_uint16(domid), c_int(mem_type), c_uint64(first_pfn), c_uint32(nr))

    def inject_event(self, domid: int, vcpu: int, vector: int, type: int, error_code: int, insn_len: int,
                     extra: int) -> None:
        self._call("inject_event", c_uint16(domid), c_int(vcpu), c_uint8(vector), c_uint8(type),
                   c_uint32(error_code), c_uint8(insn_len), c_uint64(extra))

    def shutdown(self, domid: int, reason: int) -> None:
        self._call("shutdown", c_uint16(domid), c_uint(reason))

    def relocate_memory(self, domid: int, size: int, src_gfn: int, dst_gfn: int) -> None:
        self._call("relocate_memory", c_uint16(domid), c_uint32(size), c_uint64(src_gfn), c_uint64(dst_gfn))

    def pin_memory_cacheattr(self, domid: int, start: int, end: int, type: int) -> None:
        self._call("pin_memory_cacheattr", c_uint16(domid), c_uint64(start), c_uint64(end), c_uint32(type))

    def nr_vcpus(self, domid: int) -> int:
        vcpus = c_uint()
        self._call("nr_vcpus", c_uint16(domid), byref(vcpus))
        return vcpus.value

    def restrict(self, domid: int) -> None:
        self._call("restrict", c_uint16(domid))
