"""Mirror of ``xen/include/public/hvm/ioreq.h``: the pages an ioreq server shares with Xen.

Provenance: Xen 4.17.7 (Debian 12 ``libxen-dev``, ``/usr/include/xen/hvm/ioreq.h``),
unchanged in 4.23-dev.

``buf_ioreq`` is declared with every bitfield on a ``uint32_t`` unit.  The literal
spelling (``uint8_t`` bitfields followed by ``uint32_t addr:20``) makes CPython's
ctypes start a new 32-bit unit for ``addr`` and gives 12 bytes with ``data`` at 8;
gcc packs ``addr`` into bits 12..31 of the first word and gives 8 bytes with
``data`` at 4.  Declaring all five on one ``c_uint32`` reproduces gcc's layout bit
for bit (checked against the real header in ``tests/test_abi_headers.py``).
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

HEADERS = ("xen/hvm/ioreq.h",)
COMPLETE = True

IOREQ_READ = 1
IOREQ_WRITE = 0

STATE_IOREQ_NONE = 0
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3

IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8

IOREQ_BUFFER_SLOT_NUM = 511

ACPI_PM1A_EVT_BLK_ADDRESS_V0 = 0x1F40
ACPI_PM1A_CNT_BLK_ADDRESS_V0 = ACPI_PM1A_EVT_BLK_ADDRESS_V0 + 0x04
ACPI_PM_TMR_BLK_ADDRESS_V0 = ACPI_PM1A_EVT_BLK_ADDRESS_V0 + 0x08
ACPI_GPE0_BLK_ADDRESS_V0 = ACPI_PM_TMR_BLK_ADDRESS_V0 + 0x20
ACPI_GPE0_BLK_LEN_V0 = 0x08
ACPI_PM1A_EVT_BLK_ADDRESS_V1 = 0xB000
ACPI_PM1A_CNT_BLK_ADDRESS_V1 = ACPI_PM1A_EVT_BLK_ADDRESS_V1 + 0x04
ACPI_PM_TMR_BLK_ADDRESS_V1 = ACPI_PM1A_EVT_BLK_ADDRESS_V1 + 0x08
ACPI_GPE0_BLK_ADDRESS_V1 = 0xAFE0
ACPI_GPE0_BLK_LEN_V1 = 0x04
ACPI_PM1A_EVT_BLK_ADDRESS = ACPI_PM1A_EVT_BLK_ADDRESS_V0
ACPI_PM1A_CNT_BLK_ADDRESS = ACPI_PM1A_CNT_BLK_ADDRESS_V0
ACPI_PM_TMR_BLK_ADDRESS = ACPI_PM_TMR_BLK_ADDRESS_V0
ACPI_GPE0_BLK_ADDRESS = ACPI_GPE0_BLK_ADDRESS_V0
ACPI_GPE0_BLK_LEN = ACPI_GPE0_BLK_LEN_V0


class ioreq(ctypes.Structure):
    _fields_ = [
        ("addr", c_uint64),
        ("data", c_uint64),
        ("count", c_uint32),
        ("size", c_uint32),
        ("vp_eport", c_uint32),
        ("_pad0", c_uint16),
        ("state", c_uint8, 4),
        ("data_is_ptr", c_uint8, 1),
        ("dir", c_uint8, 1),
        ("df", c_uint8, 1),
        ("_pad1", c_uint8, 1),
        ("type", c_uint8),
    ]


class shared_iopage(ctypes.Structure):
    # Declared with one slot as in C; the real page holds one ioreq per vCPU.
    _fields_ = [("vcpu_ioreq", ioreq * 1)]


class buf_ioreq(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32, 8),
        ("pad", c_uint32, 1),
        ("dir", c_uint32, 1),
        ("size", c_uint32, 2),
        ("addr", c_uint32, 20),
        ("data", c_uint32),
    ]


class buffered_iopage(ctypes.Structure):
    # User-space view (no ``__XEN__``): the two pointers, not Xen's 64-bit union.
    _fields_ = [
        ("read_pointer", c_uint32),
        ("write_pointer", c_uint32),
        ("buf_ioreq", buf_ioreq * IOREQ_BUFFER_SLOT_NUM),
    ]


ioreq_t = ioreq
shared_iopage_t = shared_iopage
buf_ioreq_t = buf_ioreq
buffered_iopage_t = buffered_iopage
