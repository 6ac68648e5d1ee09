"""Mirror of ``xen/include/public/hvm/dm_op.h``: the DMOP hypercall (number 41).

Provenance: Xen 4.17.7 (Debian 12 ``libxen-dev``, ``/usr/include/xen/hvm/dm_op.h``).
Every layout here is byte-identical in Xen 4.23-dev (``c447b7308b13``); ops 19
(``set_irq_level``, Arm) and 20 (``nr_vcpus``) are present since 4.15.
``uint64_aligned_t`` is ``uint64_t`` on x86_64, so plain ``c_uint64`` is exact.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from .xen import evtchn_port_t, xen_ulong_t

HEADERS = ("xen/hvm/dm_op.h",)
COMPLETE = True

ioservid_t = c_uint16

XEN_DMOP_create_ioreq_server = 1
XEN_DMOP_get_ioreq_server_info = 2
XEN_DMOP_map_io_range_to_ioreq_server = 3
XEN_DMOP_unmap_io_range_from_ioreq_server = 4
XEN_DMOP_set_ioreq_server_state = 5
XEN_DMOP_destroy_ioreq_server = 6
XEN_DMOP_track_dirty_vram = 7
XEN_DMOP_set_pci_intx_level = 8
XEN_DMOP_set_isa_irq_level = 9
XEN_DMOP_set_pci_link_route = 10
XEN_DMOP_modified_memory = 11
XEN_DMOP_set_mem_type = 12
XEN_DMOP_inject_event = 13
XEN_DMOP_inject_msi = 14
XEN_DMOP_map_mem_type_to_ioreq_server = 15
XEN_DMOP_remote_shutdown = 16
XEN_DMOP_relocate_memory = 17
XEN_DMOP_pin_memory_cacheattr = 18
XEN_DMOP_set_irq_level = 19
XEN_DMOP_nr_vcpus = 20

_XEN_DMOP_no_gfns = 0
XEN_DMOP_no_gfns = 1 << _XEN_DMOP_no_gfns

XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1
XEN_DMOP_IO_RANGE_PCI = 2

XEN_DMOP_EVENT_ext_int = 0
XEN_DMOP_EVENT_nmi = 2
XEN_DMOP_EVENT_hw_exc = 3
XEN_DMOP_EVENT_sw_int = 4
XEN_DMOP_EVENT_pri_sw_exc = 5
XEN_DMOP_EVENT_sw_exc = 6

XEN_DMOP_IOREQ_MEM_ACCESS_READ = 1 << 0
XEN_DMOP_IOREQ_MEM_ACCESS_WRITE = 1 << 1

XEN_DMOP_MEM_CACHEATTR_UC = 0
XEN_DMOP_MEM_CACHEATTR_WC = 1
XEN_DMOP_MEM_CACHEATTR_WT = 4
XEN_DMOP_MEM_CACHEATTR_WP = 5
XEN_DMOP_MEM_CACHEATTR_WB = 6
XEN_DMOP_MEM_CACHEATTR_UCM = 7
XEN_DMOP_DELETE_MEM_CACHEATTR = 0xFFFFFFFF


def XEN_DMOP_PCI_SBDF(s: int, b: int, d: int, f: int) -> int:
    """Encode segment/bus/device/function as Xen's PCI range key."""
    return ((s & 0xFFFF) << 16) | ((b & 0xFF) << 8) | ((d & 0x1F) << 3) | (f & 0x7)


class xen_dm_op_create_ioreq_server(ctypes.Structure):
    _fields_ = [("handle_bufioreq", c_uint8), ("pad", c_uint8 * 3), ("id", ioservid_t)]


class xen_dm_op_get_ioreq_server_info(ctypes.Structure):
    _fields_ = [
        ("id", ioservid_t),
        ("flags", c_uint16),
        ("bufioreq_port", evtchn_port_t),
        ("ioreq_gfn", c_uint64),
        ("bufioreq_gfn", c_uint64),
    ]


class xen_dm_op_ioreq_server_range(ctypes.Structure):
    _fields_ = [
        ("id", ioservid_t),
        ("pad", c_uint16),
        ("type", c_uint32),
        ("start", c_uint64),
        ("end", c_uint64),
    ]


class xen_dm_op_set_ioreq_server_state(ctypes.Structure):
    _fields_ = [("id", ioservid_t), ("enabled", c_uint8), ("pad", c_uint8)]


class xen_dm_op_destroy_ioreq_server(ctypes.Structure):
    _fields_ = [("id", ioservid_t), ("pad", c_uint16)]


class xen_dm_op_track_dirty_vram(ctypes.Structure):
    _fields_ = [("nr", c_uint32), ("pad", c_uint32), ("first_pfn", c_uint64)]


class xen_dm_op_set_pci_intx_level(ctypes.Structure):
    _fields_ = [
        ("domain", c_uint16),
        ("bus", c_uint8),
        ("device", c_uint8),
        ("intx", c_uint8),
        ("level", c_uint8),
    ]


class xen_dm_op_set_isa_irq_level(ctypes.Structure):
    _fields_ = [("isa_irq", c_uint8), ("level", c_uint8)]


class xen_dm_op_set_pci_link_route(ctypes.Structure):
    _fields_ = [("link", c_uint8), ("isa_irq", c_uint8)]


class xen_dm_op_modified_memory(ctypes.Structure):
    _fields_ = [("nr_extents", c_uint32), ("opaque", c_uint32)]


class xen_dm_op_modified_memory_extent(ctypes.Structure):
    _fields_ = [("nr", c_uint32), ("pad", c_uint32), ("first_pfn", c_uint64)]


class xen_dm_op_set_mem_type(ctypes.Structure):
    _fields_ = [
        ("nr", c_uint32),
        ("mem_type", c_uint16),
        ("pad", c_uint16),
        ("first_pfn", c_uint64),
    ]


class xen_dm_op_inject_event(ctypes.Structure):
    _fields_ = [
        ("vcpuid", c_uint32),
        ("vector", c_uint8),
        ("type", c_uint8),
        ("insn_len", c_uint8),
        ("pad0", c_uint8),
        ("error_code", c_uint32),
        ("pad1", c_uint32),
        ("cr2", c_uint64),
    ]


class xen_dm_op_inject_msi(ctypes.Structure):
    _fields_ = [("data", c_uint32), ("pad", c_uint32), ("addr", c_uint64)]


class xen_dm_op_map_mem_type_to_ioreq_server(ctypes.Structure):
    _fields_ = [
        ("id", ioservid_t),
        ("type", c_uint16),
        ("flags", c_uint32),
        ("opaque", c_uint64),
    ]


class xen_dm_op_remote_shutdown(ctypes.Structure):
    _fields_ = [("reason", c_uint32)]


class xen_dm_op_relocate_memory(ctypes.Structure):
    _fields_ = [
        ("size", c_uint32),
        ("pad", c_uint32),
        ("src_gfn", c_uint64),
        ("dst_gfn", c_uint64),
    ]


class xen_dm_op_pin_memory_cacheattr(ctypes.Structure):
    _fields_ = [
        ("start", c_uint64),
        ("end", c_uint64),
        ("type", c_uint32),
        ("pad", c_uint32),
    ]


class xen_dm_op_set_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint8), ("pad", c_uint8 * 3)]


class xen_dm_op_nr_vcpus(ctypes.Structure):
    _fields_ = [("vcpus", c_uint32)]


class _xen_dm_op_u(ctypes.Union):
    # The anonymous union ``u`` of struct xen_dm_op, members named as in C.
    _fields_ = [
        ("create_ioreq_server", xen_dm_op_create_ioreq_server),
        ("get_ioreq_server_info", xen_dm_op_get_ioreq_server_info),
        ("map_io_range_to_ioreq_server", xen_dm_op_ioreq_server_range),
        ("unmap_io_range_from_ioreq_server", xen_dm_op_ioreq_server_range),
        ("set_ioreq_server_state", xen_dm_op_set_ioreq_server_state),
        ("destroy_ioreq_server", xen_dm_op_destroy_ioreq_server),
        ("track_dirty_vram", xen_dm_op_track_dirty_vram),
        ("set_pci_intx_level", xen_dm_op_set_pci_intx_level),
        ("set_isa_irq_level", xen_dm_op_set_isa_irq_level),
        ("set_irq_level", xen_dm_op_set_irq_level),
        ("set_pci_link_route", xen_dm_op_set_pci_link_route),
        ("modified_memory", xen_dm_op_modified_memory),
        ("set_mem_type", xen_dm_op_set_mem_type),
        ("inject_event", xen_dm_op_inject_event),
        ("inject_msi", xen_dm_op_inject_msi),
        ("map_mem_type_to_ioreq_server", xen_dm_op_map_mem_type_to_ioreq_server),
        ("remote_shutdown", xen_dm_op_remote_shutdown),
        ("relocate_memory", xen_dm_op_relocate_memory),
        ("pin_memory_cacheattr", xen_dm_op_pin_memory_cacheattr),
        ("nr_vcpus", xen_dm_op_nr_vcpus),
    ]


class xen_dm_op(ctypes.Structure):
    _fields_ = [("op", c_uint32), ("pad", c_uint32), ("u", _xen_dm_op_u)]


class xen_dm_op_buf(ctypes.Structure):
    # XEN_GUEST_HANDLE(void) is a plain pointer on x86_64.
    _fields_ = [("h", ctypes.c_void_p), ("size", xen_ulong_t)]


# C typedefs (``typedef struct X X_t``); the registry lists them under both names.
xen_dm_op_create_ioreq_server_t = xen_dm_op_create_ioreq_server
xen_dm_op_get_ioreq_server_info_t = xen_dm_op_get_ioreq_server_info
xen_dm_op_ioreq_server_range_t = xen_dm_op_ioreq_server_range
xen_dm_op_set_ioreq_server_state_t = xen_dm_op_set_ioreq_server_state
xen_dm_op_destroy_ioreq_server_t = xen_dm_op_destroy_ioreq_server
xen_dm_op_track_dirty_vram_t = xen_dm_op_track_dirty_vram
xen_dm_op_set_pci_intx_level_t = xen_dm_op_set_pci_intx_level
xen_dm_op_set_isa_irq_level_t = xen_dm_op_set_isa_irq_level
xen_dm_op_set_pci_link_route_t = xen_dm_op_set_pci_link_route
xen_dm_op_modified_memory_t = xen_dm_op_modified_memory
xen_dm_op_set_mem_type_t = xen_dm_op_set_mem_type
xen_dm_op_inject_event_t = xen_dm_op_inject_event
xen_dm_op_inject_msi_t = xen_dm_op_inject_msi
xen_dm_op_map_mem_type_to_ioreq_server_t = xen_dm_op_map_mem_type_to_ioreq_server
xen_dm_op_remote_shutdown_t = xen_dm_op_remote_shutdown
xen_dm_op_relocate_memory_t = xen_dm_op_relocate_memory
xen_dm_op_pin_memory_cacheattr_t = xen_dm_op_pin_memory_cacheattr
xen_dm_op_set_irq_level_t = xen_dm_op_set_irq_level
xen_dm_op_nr_vcpus_t = xen_dm_op_nr_vcpus
xen_dm_op_buf_t = xen_dm_op_buf
