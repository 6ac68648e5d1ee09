"""Mirror of the ioreq-related parts of ``hvm/hvm_op.h`` and ``hvm/params.h``.

Provenance: Xen 4.17.7 (Debian 12 ``libxen-dev``).  ``hvmmem_type_t`` as seen with
``__XEN_INTERFACE_VERSION__ >= 0x00040700`` (``HVMMEM_unused``, not the old
``HVMMEM_mmio_write_dm``).
"""

from __future__ import annotations

import ctypes

HEADERS = ("xen/hvm/hvm_op.h", "xen/hvm/params.h")
COMPLETE = False

hvmmem_type_t = ctypes.c_uint32  # a C enum: 4 bytes on x86_64

HVMMEM_ram_rw = 0
HVMMEM_ram_ro = 1
HVMMEM_mmio_dm = 2
HVMMEM_unused = 3
HVMMEM_ioreq_server = 4

HVM_IOREQSRV_BUFIOREQ_OFF = 0
HVM_IOREQSRV_BUFIOREQ_LEGACY = 1
HVM_IOREQSRV_BUFIOREQ_ATOMIC = 2

HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_BUFIOREQ_EVTCHN = 26
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
