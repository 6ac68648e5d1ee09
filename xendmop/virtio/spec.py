"""Numbers from the virtio 1.x specification (OASIS virtio v1.2, sections 2, 4.1, 5).

Written from the specification's text; the names follow Linux's ``include/uapi/linux/virtio_*.h``
so that a grep from one finds the other.
"""

from __future__ import annotations

import enum
import struct

# --- device status (2.1) ---------------------------------------------------------------------------


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


# --- reserved feature bits (6) ------------------------------------------------------------------------

VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# --- device types (5) ------------------------------------------------------------------------------------

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

#: a non-transitional virtio PCI function's device id is 0x1040 plus the device type (4.1.2.1)
PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_DEVICE_ID_MODERN_BASE = 0x1040

# --- virtio PCI capabilities (4.1.4) -----------------------------------------------------------------

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
#: ``struct virtio_pci_cap``: vndr, next, len, cfg_type, bar, id, 2 pad, offset, length
VIRTIO_PCI_CAP = struct.Struct("<BBBBBB2xII")
VIRTIO_PCI_NOTIFY_CAP_LEN = VIRTIO_PCI_CAP.size + 4  # + notify_off_multiplier

#: ``struct virtio_pci_common_cfg`` field offsets (4.1.4.3)
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34
COMMON_Q_NDATA = 0x38
COMMON_Q_RESET = 0x3A
COMMON_CFG_SIZE = 0x3C

VIRTIO_MSI_NO_VECTOR = 0xFFFF
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# MSI-X (PCI 3.0 6.8.2)
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

# --- split virtqueues (2.7) ----------------------------------------------------------------------------

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
#: ``struct virtq_desc``: addr, len, flags, next
VIRTQ_DESC = struct.Struct("<QIHH")
#: ``struct virtq_used_elem``: id, len
VIRTQ_USED_ELEM = struct.Struct("<II")
#: the largest queue a split virtqueue may have (2.7: "The maximum Queue Size value is 32768")
MAX_QUEUE_SIZE = 32768
#: alignment of the descriptor table, the driver (available) and the device (used) areas (2.7)
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def desc_table_size(num: int) -> int:
    return 16 * num


def avail_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def used_size(num: int) -> int:
    """flags, idx, ring[num], avail_event."""
    return 6 + 8 * num


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10: notify when ``event_idx`` lies in (old_idx, new_idx], modulo 2**16."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF
