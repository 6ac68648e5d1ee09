"""``VirtioPci``: the virtio 1.x PCI transport ("modern", no legacy interface; spec 4.1).

The function is 1AF4:(1040 + device type), revision 1.  Its capability list holds the
MSI-X capability and the virtio vendor capabilities, each naming a BAR and a range:

======== ======= ============================================================================
BAR      offset  what
======== ======= ============================================================================
1        0x000   MSI-X table (one entry per queue, plus one for configuration changes)
1        0x800   MSI-X pending bit array
4        0x0000  common configuration (``struct virtio_pci_common_cfg``)
4        0x1000  ISR status (a read returns and clears it, and lowers INTx)
4        0x2000  device-specific configuration
4        0x3000  notifications: queue ``n`` at ``n * 4`` (``queue_notify_off`` = n, multiplier 4)
======== ======= ============================================================================

(QEMU's virtio-pci puts them in the same BARs.)  A VIRTIO_PCI_CAP_PCI_CFG capability gives
config-space access to any of them: the driver writes bar, offset and length into it, then
reads or writes ``pci_cfg_data`` (spec 4.1.4.9).  Interrupts go out as MSI-X messages
through ``inject_msi`` when the driver enabled MSI-X — a masked vector's message waits
in the PBA until it is unmasked (except a Xen PIRQ message, which Linux on Xen programs
and never unmasks: it is always sent, as QEMU sends it) — else through the ISR and INTA#.

A queue notification (a write to the notify region) is served during the guest's access
unless the transport was given a ``ServeLoop`` (``attach``): then the access is answered at
once and the queue served from the loop right after, as QEMU's devices work after the
access: virtio-net transmits from a bottom half (``hw/net/virtio-net.c``,
``virtio_net_handle_tx_bh``), virtio-blk submits asynchronous I/O (``hw/block/virtio-blk.c``).
The guest's vCPU runs on meanwhile, and the chains it makes available while the device
works need no notification of their own: with VIRTIO_F_EVENT_IDX the device writes
``avail_event`` only once it has drained the queue (``Virtqueue.chains``).

The driver is untrusted: an access of the wrong width, a queue programmed with a size
that is not a power of two, misaligned rings, a broken ring or chain (``VirtqueueError``)
never raises into the dispatcher.  Each is a rate-limited log line; a broken ring or queue
setup also sets DEVICE_NEEDS_RESET and sends a configuration-change interrupt (spec 2.1.2,
4.1.4.3.1), after which the device touches no queue until the driver resets it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..runtime.dispatch import GuestMemory
from ..runtime.pci import PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST, Bar, PciFunction
from .device import VirtioDevice
from .spec import (
    COMMON_CFG_SIZE,
    COMMON_CFGGENERATION,
    COMMON_DF,
    COMMON_DFSELECT,
    COMMON_GF,
    COMMON_GFSELECT,
    COMMON_MSIX,
    COMMON_NUMQ,
    COMMON_Q_AVAILLO,
    COMMON_Q_DESCLO,
    COMMON_Q_ENABLE,
    COMMON_Q_MSIX,
    COMMON_Q_NDATA,
    COMMON_Q_NOFF,
    COMMON_Q_RESET,
    COMMON_Q_SELECT,
    COMMON_Q_SIZE,
    COMMON_Q_USEDLO,
    COMMON_STATUS,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_DEVICE_ID_MODERN_BASE,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_VENDOR_ID_REDHAT_QUMRANET,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
)
from .transport import VirtioTransport
from .virtqueue import Virtqueue

if TYPE_CHECKING:
    pass

__all__ = ["MSIX_BAR", "VIRTIO_BAR", "VirtioPci"]

log = logging.getLogger("xendmop.virtio")

MSIX_BAR, MSIX_BAR_SIZE, MSIX_TABLE, MSIX_PBA = 1, 0x1000, 0x000, 0x800
VIRTIO_BAR, VIRTIO_BAR_SIZE = 4, 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
#: x86 MSI addresses: 0xFEEx_xxxx (the local APICs' window)
MSI_ADDRESS_BASE = 0xFEE00000
#: where the capabilities sit in config space
MSIX_CAP, COMMON_CAP, NOTIFY_CAP, ISR_CAP, DEVICE_CAP, PCI_CFG_CAP = 0x40, 0x50, 0x60, 0x78, 0x88, 0x98
#: ``virtio_pci_cfg_cap.pci_cfg_data``: the window onto a BAR through config space (4.1.4.9)
PCI_CFG_DATA = PCI_CFG_CAP + 16
#: PCI class codes: what Linux and QEMU give each device type (network, SCSI storage, simple comm, other)
_CLASS = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}
_U32 = 0xFFFFFFFF
#: the 16-bit registers of ``virtio_pci_common_cfg`` and whether the driver may write them
_COMMON16 = {
    COMMON_MSIX: True,
    COMMON_NUMQ: False,
    COMMON_Q_SELECT: True,
    COMMON_Q_SIZE: True,
    COMMON_Q_MSIX: True,
    COMMON_Q_ENABLE: True,
    COMMON_Q_NOFF: False,
    COMMON_Q_NDATA: False,
    COMMON_Q_RESET: True,
}
_QUEUE_ADDRS = {COMMON_Q_DESCLO: "desc", COMMON_Q_AVAILLO: "avail", COMMON_Q_USEDLO: "used"}


class _Region:
    """One BAR, answering with its owner's method for accesses to it."""

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]) -> None:
        self.read = read
        self.write = write


class VirtioPciFunction(PciFunction):
    """Config space of a virtio PCI function: the standard header, MSI-X and the virtio capabilities."""

    def __init__(self, transport: VirtioPci, device_type: int, nr_vectors: int) -> None:
        super().__init__(
            PCI_VENDOR_ID_REDHAT_QUMRANET,
            PCI_DEVICE_ID_MODERN_BASE + device_type,
            _CLASS.get(device_type, 0xFF0000),
            revision=1,  # non-transitional (4.1.2.1)
            subsystem_vendor_id=PCI_VENDOR_ID_REDHAT_QUMRANET,
            subsystem_id=0x40,  # 4.1.2.1: any value; QEMU uses 0x1100 (QEMU's id), Linux does not check
            bars=[
                None,
                Bar(MSIX_BAR_SIZE, _Region(transport.msix_read, transport.msix_write)),
                None,
                None,
                Bar(VIRTIO_BAR_SIZE, _Region(transport.bar_read, transport.bar_write)),
            ],
        )
        self.transport = transport
        self._put(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        self._put(PCI_CAPABILITY_LIST, 1, MSIX_CAP)
        # MSI-X: table size - 1, table and PBA offsets with the BAR in the low 3 bits
        self._put(MSIX_CAP, 1, PCI_CAP_ID_MSIX)
        self._put(MSIX_CAP + 1, 1, COMMON_CAP)
        self._put(MSIX_CAP + 2, 2, nr_vectors - 1)
        self._wm(MSIX_CAP + 2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self._put(MSIX_CAP + 4, 4, MSIX_TABLE | MSIX_BAR)
        self._put(MSIX_CAP + 8, 4, MSIX_PBA | MSIX_BAR)
        caps = [
            (COMMON_CAP, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, COMMON_CFG_SIZE, NOTIFY_CAP),
            (NOTIFY_CAP, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, REGION_SIZE, ISR_CAP),
            (ISR_CAP, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 1, DEVICE_CAP),
            (DEVICE_CAP, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, REGION_SIZE, PCI_CFG_CAP),
            (PCI_CFG_CAP, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0),
        ]
        for at, cfg_type, offset, length, nxt in caps:
            cap_len = VIRTIO_PCI_CAP.size + (
                4 if cfg_type in (VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG) else 0
            )
            bar = 0 if cfg_type == VIRTIO_PCI_CAP_PCI_CFG else VIRTIO_BAR
            raw = VIRTIO_PCI_CAP.pack(PCI_CAP_ID_VNDR, nxt, cap_len, cfg_type, bar, 0, offset, length)
            self.cfg[at : at + len(raw)] = raw
        self._put(NOTIFY_CAP + VIRTIO_PCI_CAP.size, 4, NOTIFY_MULTIPLIER)
        # The driver picks the window with bar, offset and length, then accesses pci_cfg_data.
        self._wm(PCI_CFG_CAP + 4, 1, 0xFF)
        self._wm(PCI_CFG_CAP + 8, 4, 0xFFFFFFFF)
        self._wm(PCI_CFG_CAP + 12, 4, 0xFFFFFFFF)

    @property
    def msix_control(self) -> int:
        return self._get(MSIX_CAP + 2, 2)

    def _window(
        self, addr: int, size: int
    ) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None], int, int] | None:
        """An access to pci_cfg_data: the BAR's handlers, offset and length the driver chose,
        or None when it is not one (4.1.4.9.1: lengths 1, 2, 4, aligned; a BAR of this function)."""
        if addr != PCI_CFG_DATA:
            return None
        bar, offset, length = (
            self._get(PCI_CFG_CAP + 4, 1),
            self._get(PCI_CFG_CAP + 8, 4),
            self._get(PCI_CFG_CAP + 12, 4),
        )
        target = self.bars[bar] if bar < 6 else None
        if (
            target is None
            or length not in (1, 2, 4)
            or size != length
            or offset % length
            or offset + length > target.size
        ):
            return None
        region = target.device
        return region.read, region.write, offset, length

    def read(self, addr: int, size: int) -> int:
        window = self._window(addr, size)
        if window is not None:
            return window[0](window[2], window[3])
        return super().read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        window = self._window(addr, size)
        if window is not None:
            window[1](window[2], window[3], value)
            return
        before = self.msix_control
        super().write(addr, size, value)
        if self.msix_control != before:
            self.transport.msix_changed()


class VirtioPci(VirtioTransport):
    """The PCI transport for one ``VirtioDevice``; add ``.pci`` to an ``IoreqServer``
    (``server.add_pci(transport.pci, slot=...)``).  Arguments as ``VirtioTransport``'s."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: Callable[[], GuestMemory | None],
        *,
        indirect: bool = True,
        event_idx: bool = True,
        ram_limit: int | None = None,
        logger: logging.Logger = log,
    ) -> None:
        super().__init__(device, memory, indirect=indirect, event_idx=event_idx, ram_limit=ram_limit, logger=logger)
        self.nr_vectors = len(self.queues) + 1
        self.msix_table = bytearray(PCI_MSIX_ENTRY_SIZE * self.nr_vectors)
        self.msix_pba = bytearray((self.nr_vectors + 63) // 64 * 8)
        for v in range(self.nr_vectors):  # entries come up masked (PCI 3.0 6.8.2.9)
            self.msix_table[v * PCI_MSIX_ENTRY_SIZE + 12] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pci = VirtioPciFunction(self, device.device_type, self.nr_vectors)
        self._bind()

    # --- state ---------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        super()._reset_state()
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.isr = 0

    def _lower(self) -> None:
        self.pci.set_irq(False)

    # --- interrupts ------------------------------------------------------------------------------

    @property
    def msix_enabled(self) -> bool:
        return bool(self.pci.msix_control & PCI_MSIX_FLAGS_ENABLE)

    def _message(self, vector: int) -> tuple[int, int]:
        """The (address, data) the driver programmed into ``vector``'s table entry."""
        entry = self.msix_table[vector * PCI_MSIX_ENTRY_SIZE : (vector + 1) * PCI_MSIX_ENTRY_SIZE]
        return int.from_bytes(entry[0:8], "little"), int.from_bytes(entry[8:12], "little")

    def _xen_pirq(self, vector: int) -> bool:
        """The entry holds a Xen PIRQ message: an MSI address (0xFEEx_xxxx) with vector field 0,
        the pirq in the destination bits.  Linux as a Xen HVM guest programs its vectors so
        (``xen_hvm_setup_msi_irqs``) and never touches the mask bits (``pci_msi_ignore_mask``):
        masking is the event channel's, and Xen's ``hvm_inject_msi`` routes the message there."""
        addr, data = self._message(vector)
        return addr & 0xFFF00000 == MSI_ADDRESS_BASE and data & 0xFF == 0

    def _masked(self, vector: int) -> bool:
        if self._xen_pirq(vector):  # as QEMU's msix_vector_masked: the entry's bits do not hold it
            return False
        ctrl = self.msix_table[vector * PCI_MSIX_ENTRY_SIZE + 12]
        return bool(self.pci.msix_control & PCI_MSIX_FLAGS_MASKALL or ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _send_msix(self, vector: int) -> None:
        addr, data = self._message(vector)
        host = self.pci.host
        if host is None:
            return
        try:
            host.inject_msi(self.pci, addr, data)
        except OSError as e:  # Xen refused the message (a bad address or pirq): the driver's doing
            self._ignored("inject-msi", f"vector {vector} ({addr:#x}, {data:#x}): {e}")

    def _signal(self, vector: int, isr_bit: int) -> None:
        if self.msix_enabled:
            if vector == VIRTIO_MSI_NO_VECTOR or vector >= self.nr_vectors:
                return
            if self._masked(vector):
                self.msix_pba[vector // 8] |= 1 << (vector % 8)
                return
            self._send_msix(vector)
        else:
            self.isr |= isr_bit
            self.pci.set_irq(True)

    @property
    def config_vector(self) -> int:
        return self.config_msix_vector

    def msix_changed(self) -> None:
        """MSI-X was enabled, unmasked or masked: send what waits in the PBA and is now unmasked."""
        if not self.msix_enabled:
            return
        for vector in range(self.nr_vectors):
            if self.msix_pba[vector // 8] >> (vector % 8) & 1 and not self._masked(vector):
                self.msix_pba[vector // 8] &= ~(1 << (vector % 8))
                self._send_msix(vector)

    # --- BAR 4: the virtio structures ----------------------------------------------------------------

    def bar_read(self, addr: int, size: int) -> int:
        if COMMON_OFF <= addr < COMMON_OFF + REGION_SIZE:
            return self._common_read(addr - COMMON_OFF, size)
        if ISR_OFF <= addr < ISR_OFF + REGION_SIZE:
            if addr != ISR_OFF or size != 1:
                self._ignored("bad-isr-access", f"{size}-byte read at ISR+{addr - ISR_OFF:#x}")
                return 0
            isr, self.isr = self.isr, 0
            self.pci.set_irq(False)
            return isr
        if DEVICE_OFF <= addr < DEVICE_OFF + REGION_SIZE:
            off = addr - DEVICE_OFF
            raw = self.device.config()
            return int.from_bytes(raw[off : off + size].ljust(size, b"\0"), "little")
        return 0  # notify region: write-only

    def bar_write(self, addr: int, size: int, value: int) -> None:
        if COMMON_OFF <= addr < COMMON_OFF + REGION_SIZE:
            self._common_write(addr - COMMON_OFF, size, value)
        elif DEVICE_OFF <= addr < DEVICE_OFF + REGION_SIZE:
            self.device.write_config(addr - DEVICE_OFF, size, value)
        elif NOTIFY_OFF <= addr < NOTIFY_OFF + REGION_SIZE:
            off = addr - NOTIFY_OFF
            if off % NOTIFY_MULTIPLIER:
                self._ignored("bad-notify", f"{size}-byte write at notify+{off:#x}")
                return
            self.notified(off // NOTIFY_MULTIPLIER)
        else:
            self._ignored("bad-isr-access", f"{size}-byte write at ISR+{addr - ISR_OFF:#x}")

    def _common_read(self, off: int, size: int) -> int:
        vq = self.selected_queue
        if size == 4 and off in (COMMON_DFSELECT, COMMON_DF, COMMON_GFSELECT, COMMON_GF):
            if off == COMMON_DFSELECT:
                return self.device_feature_select
            if off == COMMON_DF:
                return self.device_features_word()
            if off == COMMON_GFSELECT:
                return self.driver_feature_select
            return self.driver_features_word()
        if size == 1 and off == COMMON_STATUS:
            return self.status
        if size == 1 and off == COMMON_CFGGENERATION:
            return self.config_generation
        if size == 2 and off in _COMMON16:
            if off == COMMON_MSIX:
                return self.config_msix_vector
            if off == COMMON_NUMQ:
                return len(self.queues)
            if off == COMMON_Q_SELECT:
                return self.queue_select
            if vq is None:  # 4.1.4.3.2: a queue that is not there reads size 0
                return 0
            return {
                COMMON_Q_SIZE: vq.size,
                COMMON_Q_MSIX: vq.msix_vector,
                COMMON_Q_ENABLE: int(vq.enabled),
                COMMON_Q_NOFF: vq.index,
                COMMON_Q_NDATA: vq.index,
                COMMON_Q_RESET: 0,
            }[off]
        for lo, name in _QUEUE_ADDRS.items():
            if vq is not None and ((size == 8 and off == lo) or (size == 4 and off in (lo, lo + 4))):
                value: int = getattr(vq, name)
                return value if size == 8 else value >> (8 * (off - lo)) & _U32
        self._ignored("bad-common-access", f"{size}-byte read at common+{off:#x}")
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        vq = self.selected_queue
        if size == 4 and off == COMMON_DFSELECT:
            self.device_feature_select = value
        elif size == 4 and off == COMMON_GFSELECT:
            self.driver_feature_select = value
        elif size == 4 and off == COMMON_GF:
            self.write_driver_features_word(value)
        elif size == 1 and off == COMMON_STATUS:
            self.write_status(value)
        elif size == 2 and off == COMMON_MSIX:
            self.config_msix_vector = value if value < self.nr_vectors else VIRTIO_MSI_NO_VECTOR
        elif size == 2 and off == COMMON_Q_SELECT:
            self.queue_select = value
        elif size == 2 and off in (COMMON_Q_SIZE, COMMON_Q_MSIX, COMMON_Q_ENABLE) and vq is not None:
            self._write_queue16(vq, off, value)
        elif size == 2 and off in _COMMON16 and vq is None:
            self._ignored("no-such-queue", f"queue_select {self.queue_select} of {len(self.queues)}")
        elif vq is not None and any(
            (size == 8 and off == lo) or (size == 4 and off in (lo, lo + 4)) for lo in _QUEUE_ADDRS
        ):
            lo = off & ~7
            self.set_queue_address(vq, _QUEUE_ADDRS[lo], off - lo, size, value)
        else:
            self._ignored("bad-common-access", f"{size}-byte write of {value:#x} at common+{off:#x}")

    def _write_queue16(self, vq: Virtqueue, off: int, value: int) -> None:
        if off == COMMON_Q_MSIX:
            vq.msix_vector = value if value < self.nr_vectors else VIRTIO_MSI_NO_VECTOR
            return
        if vq.enabled:
            self._ignored("queue-enabled", f"queue {vq.index} register {off:#x} written while enabled")
            return
        if off == COMMON_Q_SIZE:
            vq.size = value  # checked when the queue is enabled
        elif value == 1:
            self.enable_queue(vq)
        else:
            self._ignored("queue-disable", f"queue {vq.index}: queue_enable={value} (only 1 may be written)")

    # --- BAR 1: MSI-X table and PBA -----------------------------------------------------------------

    def msix_read(self, addr: int, size: int) -> int:
        if size not in (4, 8) or addr % size:
            self._ignored("bad-msix-access", f"{size}-byte read at MSI-X BAR+{addr:#x}")
            return 0
        if MSIX_TABLE <= addr < MSIX_TABLE + len(self.msix_table):
            return int.from_bytes(self.msix_table[addr : addr + size], "little")
        off = addr - MSIX_PBA
        if 0 <= off < len(self.msix_pba):
            return int.from_bytes(self.msix_pba[off : off + size], "little")
        return 0

    def msix_write(self, addr: int, size: int, value: int) -> None:
        if size not in (4, 8) or addr % size or not MSIX_TABLE <= addr < MSIX_TABLE + len(self.msix_table):
            self._ignored("bad-msix-access", f"{size}-byte write at MSI-X BAR+{addr:#x}")
            return
        for i in range(size // 4):
            word = addr + 4 * i
            part = value >> (32 * i) & _U32
            if word % PCI_MSIX_ENTRY_SIZE == 12:
                part &= PCI_MSIX_ENTRY_CTRL_MASKBIT
            self.msix_table[word : word + 4] = part.to_bytes(4, "little")
        self.msix_changed()
