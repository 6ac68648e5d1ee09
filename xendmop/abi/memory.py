"""Mirror of ``XENMEM_acquire_resource`` from ``xen/include/public/memory.h``.

Provenance: Xen 4.17.7 (Debian 12 ``libxen-dev``); the struct is visible to C only
with ``__XEN_TOOLS__`` defined.  Unchanged in 4.23-dev.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint16, c_uint32, c_uint64

from .xen import domid_t

HEADERS = ("xen/memory.h",)
COMPLETE = False

XENMEM_acquire_resource = 28

XENMEM_resource_ioreq_server = 0
XENMEM_resource_grant_table = 1
XENMEM_resource_vmtrace_buf = 2

XENMEM_resource_grant_table_id_shared = 0
XENMEM_resource_grant_table_id_status = 1

XENMEM_resource_ioreq_server_frame_bufioreq = 0


def XENMEM_resource_ioreq_server_frame_ioreq(n: int) -> int:
    """Frame index of the n-th synchronous ioreq page of a server."""
    return 1 + n


class xen_mem_acquire_resource(ctypes.Structure):
    _fields_ = [
        ("domid", domid_t),
        ("type", c_uint16),
        ("id", c_uint32),
        ("nr_frames", c_uint32),
        ("pad", c_uint32),
        ("frame", c_uint64),
        ("frame_list", ctypes.c_void_p),  # XEN_GUEST_HANDLE(xen_pfn_t)
    ]


xen_mem_acquire_resource_t = xen_mem_acquire_resource
