"""Mirror of Linux ``include/uapi/xen/privcmd.h`` (``/dev/xen/privcmd``).

Provenance: Linux 6.1 UAPI (Debian 12 ``linux-libc-dev``, ``/usr/include/xen/privcmd.h``)
for everything up to ``IOCTL_PRIVCMD_MMAP_RESOURCE``.  Newer than Debian 12 (see
``PROVENANCE``): ``privcmd_irqfd``/``IOCTL_PRIVCMD_IRQFD`` and ``privcmd_ioeventfd``/
``IOCTL_PRIVCMD_IOEVENTFD`` (Linux 6.7), ``privcmd_pcidev_get_gsi``/
``IOCTL_PRIVCMD_PCIDEV_GET_GSI`` (Linux 6.12); ``IOCTL_PRIVCMD_UNIMPLEMENTED`` is
from Xen's ``tools/include/xen-sys/Linux/privcmd.h``.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

from .ioctl import _IOC, _IOC_NONE, _IOW
from .xen import domid_t

HEADERS = ("xen/privcmd.h",)

#: the device nodes (Linux drivers/xen/privcmd.c, privcmd-buf.c); defined here once for the
#: backends, the mock and depriv (not C names: ``abi``'s registries take only ints and types)
PRIVCMD_PATH = "/dev/xen/privcmd"
HYPERCALL_PATH = "/dev/xen/hypercall"
COMPLETE = True

PROVENANCE = {
    "privcmd_irqfd": "Linux 6.7 include/uapi/xen/privcmd.h",
    "privcmd_ioeventfd": "Linux 6.7 include/uapi/xen/privcmd.h",
    "privcmd_pcidev_get_gsi": "Linux 6.12 include/uapi/xen/privcmd.h",
    "PRIVCMD_IRQFD_FLAG_DEASSIGN": "Linux 6.7 include/uapi/xen/privcmd.h",
    "PRIVCMD_IOEVENTFD_FLAG_DEASSIGN": "Linux 6.7 include/uapi/xen/privcmd.h",
    "IOCTL_PRIVCMD_IRQFD": "Linux 6.7 include/uapi/xen/privcmd.h",
    "IOCTL_PRIVCMD_IOEVENTFD": "Linux 6.7 include/uapi/xen/privcmd.h",
    "IOCTL_PRIVCMD_PCIDEV_GET_GSI": "Linux 6.12 include/uapi/xen/privcmd.h",
    "IOCTL_PRIVCMD_UNIMPLEMENTED": "Xen 4.17 tools/include/xen-sys/Linux/privcmd.h",
}


class privcmd_hypercall(ctypes.Structure):
    _fields_ = [("op", c_uint64), ("arg", c_uint64 * 5)]


class privcmd_mmap_entry(ctypes.Structure):
    _fields_ = [("va", c_uint64), ("mfn", c_uint64), ("npages", c_uint64)]


class privcmd_mmap(ctypes.Structure):
    _fields_ = [("num", c_int), ("dom", domid_t), ("entry", c_void_p)]


class privcmd_mmapbatch(ctypes.Structure):
    _fields_ = [("num", c_int), ("dom", domid_t), ("addr", c_uint64), ("arr", c_void_p)]


PRIVCMD_MMAPBATCH_MFN_ERROR = 0xF0000000
PRIVCMD_MMAPBATCH_PAGED_ERROR = 0x80000000


class privcmd_mmapbatch_v2(ctypes.Structure):
    _fields_ = [
        ("num", c_uint),
        ("dom", domid_t),
        ("addr", c_uint64),
        ("arr", c_void_p),  # const xen_pfn_t *
        ("err", c_void_p),  # int *
    ]


class privcmd_dm_op_buf(ctypes.Structure):
    _fields_ = [("uptr", c_void_p), ("size", ctypes.c_size_t)]


class privcmd_dm_op(ctypes.Structure):
    _fields_ = [("dom", domid_t), ("num", c_uint16), ("ubufs", c_void_p)]


class privcmd_mmap_resource(ctypes.Structure):
    _fields_ = [
        ("dom", domid_t),
        ("type", c_uint32),
        ("id", c_uint32),
        ("idx", c_uint32),
        ("num", c_uint64),
        ("addr", c_uint64),
    ]


PRIVCMD_IRQFD_FLAG_DEASSIGN = 1 << 0


class privcmd_irqfd(ctypes.Structure):
    _fields_ = [
        ("dm_op", c_uint64),
        ("size", c_uint32),
        ("fd", c_uint32),
        ("flags", c_uint32),
        ("dom", domid_t),
        ("pad", c_uint8 * 2),
    ]


PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1 << 0


class privcmd_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("ioreq", c_uint64),
        ("ports", c_uint64),
        ("addr", c_uint64),
        ("addr_len", c_uint32),
        ("event_fd", c_uint32),
        ("vcpus", c_uint32),
        ("vq", c_uint32),
        ("flags", c_uint32),
        ("dom", domid_t),
        ("pad", c_uint8 * 2),
    ]


class privcmd_pcidev_get_gsi(ctypes.Structure):
    _fields_ = [("sbdf", c_uint32), ("gsi", c_uint32)]


_P = "P"
IOCTL_PRIVCMD_HYPERCALL = _IOC(_IOC_NONE, _P, 0, ctypes.sizeof(privcmd_hypercall))
IOCTL_PRIVCMD_MMAP = _IOC(_IOC_NONE, _P, 2, ctypes.sizeof(privcmd_mmap))
IOCTL_PRIVCMD_MMAPBATCH = _IOC(_IOC_NONE, _P, 3, ctypes.sizeof(privcmd_mmapbatch))
IOCTL_PRIVCMD_MMAPBATCH_V2 = _IOC(_IOC_NONE, _P, 4, ctypes.sizeof(privcmd_mmapbatch_v2))
IOCTL_PRIVCMD_DM_OP = _IOC(_IOC_NONE, _P, 5, ctypes.sizeof(privcmd_dm_op))
IOCTL_PRIVCMD_RESTRICT = _IOC(_IOC_NONE, _P, 6, ctypes.sizeof(domid_t))
IOCTL_PRIVCMD_MMAP_RESOURCE = _IOC(_IOC_NONE, _P, 7, ctypes.sizeof(privcmd_mmap_resource))
IOCTL_PRIVCMD_IRQFD = _IOW(_P, 8, privcmd_irqfd)
IOCTL_PRIVCMD_IOEVENTFD = _IOW(_P, 9, privcmd_ioeventfd)
IOCTL_PRIVCMD_PCIDEV_GET_GSI = _IOC(_IOC_NONE, _P, 10, ctypes.sizeof(privcmd_pcidev_get_gsi))
IOCTL_PRIVCMD_UNIMPLEMENTED = _IOC(_IOC_NONE, _P, 0xFF, 0)
