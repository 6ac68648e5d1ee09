"""Mirror of ``xen/include/public/xen.h`` (the parts a device model needs).

Provenance: Xen 4.17.7 (Debian 12 ``libxen-dev``), ``/usr/include/xen/xen.h``;
unchanged in 4.23-dev.
"""

from __future__ import annotations

import ctypes

HEADERS = ("xen/xen.h", "xen/sched.h")
COMPLETE = False  # only the domid and hypercall-number parts are mirrored

domid_t = ctypes.c_uint16
xen_pfn_t = ctypes.c_uint64  # x86_64: unsigned long
xen_ulong_t = ctypes.c_uint64
evtchn_port_t = ctypes.c_uint32

__HYPERVISOR_memory_op = 12
__HYPERVISOR_event_channel_op = 32
__HYPERVISOR_hvm_op = 34
__HYPERVISOR_dm_op = 41

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
DOMID_MASK = 0x7FFF

# enum sched_shutdown_reason (xen/include/public/sched.h), used by remote_shutdown
SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5
