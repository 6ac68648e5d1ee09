"""``VirtioMmio``: the virtio 1.x MMIO transport (spec 4.2, "version 2"; no legacy interface).

What Arm guests use: a ``virtio,mmio`` node in the device tree gives the driver a register
block and one interrupt; the device type is read from the block (``DeviceID``), so any
device can sit in any slot.  On Xen/Arm the toolstack makes those nodes: xl 4.18+ from
``virtio = ["type=virtio,device,transport=mmio,backend=0"]`` (``libxl_virtio.c``), xl 4.17
from a disk with ``specification=virtio`` (``libxl_disk.c``); either way libxl gives slot
``i`` the block at ``GUEST_VIRTIO_MMIO_BASE + i * 0x200`` (0x0200_0000, public/arch-arm.h)
and SPI ``GUEST_VIRTIO_MMIO_SPI_FIRST + i`` (33), edge-rising, and writes both to the
backend's Xenstore directory (``xenstore.mmio_slots`` reads them).  With ``backend=0``
(dom0) the node has no ``iommus`` property, so the guest gives the device plain guest
physical addresses, which the device model reaches through foreign mappings as on x86.

Registers, all 32 bits wide and aligned (4.2.2.2) except the device configuration at 0x100:

====== ==================== ====== ==========================================================
offset name                 access what
====== ==================== ====== ==========================================================
0x000  MagicValue           R      0x74726976 ("virt")
0x004  Version              R      2
0x008  DeviceID             R      the device type
0x00c  VendorID             R      ``VENDOR_ID``
0x010  DeviceFeatures       R      32 bits of the offered features, chosen by 0x014
0x020  DriverFeatures       W      32 bits of the accepted features, chosen by 0x024
0x030  QueueSel             W      the queue 0x034-0x0a4 and 0x0c0 refer to
0x034  QueueNumMax          R      its largest size (0: no such queue)
0x038  QueueNum             W      its size
0x044  QueueReady           RW     1 enables it (sizes and rings checked then); 0 disables
0x050  QueueNotify          W      a queue's index: the driver made buffers available
0x060  InterruptStatus      R      bit 0 used buffers, bit 1 configuration change
0x064  InterruptACK         W      clears those bits; the line drops when none is left
0x070  Status               RW     device status; 0 resets
0x080  QueueDesc{Low,High}  W      descriptor table (and 0x090 driver area, 0x0a0 device area)
0x0ac  SHMSel, 0x0b0 SHMLen R      no shared memory regions: SHMLen reads all ones (4.2.2)
0x0fc  ConfigGeneration     R
0x100  Config               RW     the device-specific configuration
====== ==================== ====== ==========================================================

Interrupts: a used buffer or a configuration change sets its InterruptStatus bit and
raises the SPI with ``XEN_DMOP_set_irq_level`` (level 1); an acknowledgement that leaves
no bit set lowers it (level 0).  Xen's default vGIC treats every level-1 call as an edge
and ignores level 0 (xen/arch/arm/vgic.c, ``vgic_inject_irq``: "For edge triggered
interrupts we always ignore a falling edge"), and libxl declares the SPI edge-rising, so
the line is raised again for every event, not only when InterruptStatus was 0: a bit set
while the guest's handler runs would otherwise wait for the next event (Linux's
``vm_interrupt`` reads the status, acknowledges what it read, then serves the queues).

The driver is untrusted as on PCI (``transport.VirtioTransport``): a register access of
the wrong width, a write to a read-only register, a bad queue — each a rate-limited log
line; a bad queue setup also sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..runtime.dispatch import GuestMemory
from .device import VirtioDevice, check_count
from .spec import ISR_CONFIG, ISR_QUEUE
from .transport import VirtioTransport, log

if TYPE_CHECKING:
    from ..runtime import IoreqServer

__all__ = [
    "GUEST_VIRTIO_MMIO_BASE",
    "GUEST_VIRTIO_MMIO_SPI_FIRST",
    "MMIO_SIZE",
    "VirtioMmio",
    "slot_address",
]

#: Xen/Arm guests' virtio-mmio window and its first SPI (xen/include/public/arch-arm.h)
GUEST_VIRTIO_MMIO_BASE, GUEST_VIRTIO_MMIO_SIZE = 0x02000000, 0x00100000
GUEST_VIRTIO_MMIO_SPI_FIRST, GUEST_VIRTIO_MMIO_SPI_LAST = 33, 43
#: one device's block, as libxl sizes it (``VIRTIO_MMIO_DEV_SIZE``, tools/libs/light/libxl_arm.c)
MMIO_SIZE = 0x200

MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_AVAIL_LOW, QUEUE_USED_LOW = 0x080, 0x090, 0x0A0
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION, CONFIG = 0x0FC, 0x100

MAGIC = 0x74726976  # "virt", little endian
#: what DeviceID/VendorID the driver matches; Linux's virtio_mmio does not check the vendor
VENDOR_ID_XENDMOP = 0x4D445858  # "XXDM"
_QUEUE_ADDRS = {QUEUE_DESC_LOW: "desc", QUEUE_AVAIL_LOW: "avail", QUEUE_USED_LOW: "used"}
_U32 = 0xFFFFFFFF


def slot_address(index: int) -> tuple[int, int]:
    """(base, SPI) libxl gives the ``index``-th virtio-mmio device of an Arm guest
    (``alloc_virtio_mmio_base``/``alloc_virtio_mmio_irq``, tools/libs/light/libxl_arm.c)."""
    last = min(GUEST_VIRTIO_MMIO_SIZE // MMIO_SIZE, GUEST_VIRTIO_MMIO_SPI_LAST - GUEST_VIRTIO_MMIO_SPI_FIRST + 1)
    check_count("index", index, 0, last - 1)
    return GUEST_VIRTIO_MMIO_BASE + index * MMIO_SIZE, GUEST_VIRTIO_MMIO_SPI_FIRST + index


class VirtioMmio(VirtioTransport):
    """The MMIO transport for one ``VirtioDevice`` at guest physical ``base`` with interrupt
    ``irq`` (an SPI, 32..1019); ``add_to(server)`` claims the block on an ``IoreqServer``
    and sends the interrupt through it.  Other arguments as ``VirtioTransport``'s."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: Callable[[], GuestMemory | None],
        *,
        base: int,
        irq: int,
        indirect: bool = True,
        event_idx: bool = True,
        ram_limit: int | None = None,
        logger: logging.Logger = log,
    ) -> None:
        check_count("base", base, 0, (1 << 64) - MMIO_SIZE)
        if base % 0x200:
            raise ValueError(f"base={base:#x}: must be 0x200-aligned (libxl's slots are)")
        self.base = base
        self.irq = check_count("irq", irq, 32, 1019)  # SPIs (GICv3: INTIDs 32-1019)
        super().__init__(device, memory, indirect=indirect, event_idx=event_idx, ram_limit=ram_limit, logger=logger)
        self.server: IoreqServer | None = None
        self.line = False  # what we last told Xen
        self.raised = 0  # level-1 calls made (each an edge to Xen's vGIC)
        self._bind()

    def add_to(self, server: IoreqServer, name: str = "") -> None:
        """Serve the register block from ``server`` and interrupt through it."""
        server.add_mmio_range(self.base, self.base + MMIO_SIZE - 1, self, name or f"virtio-mmio@{self.base:#x}")
        self.server = server

    # --- state and the interrupt line -----------------------------------------------------------

    def _reset_state(self) -> None:
        super()._reset_state()
        self.interrupt_status = 0
        self.shm_select = 0

    def _set_line(self, level: bool) -> None:
        self.line = level
        if self.server is None:
            return
        try:
            self.server.set_irq_level(self.irq, int(level))
        except OSError as e:  # Xen refused (an SPI it gave the guest itself, one past its vGIC)
            self._ignored("set-irq-level", f"SPI {self.irq} level {int(level)}: {e}")
            return
        if level:
            self.raised += 1

    def _lower(self) -> None:
        if self.line:
            self._set_line(False)

    def _signal(self, vector: int, isr_bit: int) -> None:
        self.interrupt_status |= isr_bit
        self._set_line(True)  # every event an edge: see the module docstring

    # --- the register block -----------------------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        if addr >= CONFIG:
            off = addr - CONFIG
            raw = self.device.config()
            return int.from_bytes(raw[off : off + size].ljust(size, b"\0"), "little")
        if size != 4 or addr % 4:
            self._ignored("bad-mmio-access", f"{size}-byte read at {addr:#x}")
            return 0
        vq = self.selected_queue
        if addr == MAGIC_VALUE:
            return MAGIC
        if addr == VERSION:
            return 2
        if addr == DEVICE_ID:
            return self.device.device_type
        if addr == VENDOR_ID:
            return VENDOR_ID_XENDMOP
        if addr == DEVICE_FEATURES:
            return self.device_features_word()
        if addr == QUEUE_NUM_MAX:
            return 0 if vq is None else vq.max_size
        if addr == QUEUE_READY:
            return int(vq is not None and vq.enabled)
        if addr == INTERRUPT_STATUS:
            return self.interrupt_status
        if addr == STATUS:
            return self.status
        if addr == CONFIG_GENERATION:
            return self.config_generation
        if addr in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return _U32  # no region: length and base read ~0 (Linux's vm_get_shm_region)
        if addr == QUEUE_RESET:
            return 0
        self._ignored("bad-mmio-access", f"read of write-only or reserved register {addr:#x}")
        return 0

    def write(self, addr: int, size: int, value: int) -> None:
        if addr >= CONFIG:
            self.device.write_config(addr - CONFIG, size, value)
            return
        if size != 4 or addr % 4:
            self._ignored("bad-mmio-access", f"{size}-byte write of {value:#x} at {addr:#x}")
            return
        vq = self.selected_queue
        if addr == DEVICE_FEATURES_SEL:
            self.device_feature_select = value
        elif addr == DRIVER_FEATURES_SEL:
            self.driver_feature_select = value
        elif addr == DRIVER_FEATURES:
            self.write_driver_features_word(value)
        elif addr == QUEUE_SEL:
            self.queue_select = value
        elif addr == QUEUE_NOTIFY:
            self.notified(value & 0xFFFF)
        elif addr == INTERRUPT_ACK:
            self.interrupt_status &= ~value & (ISR_QUEUE | ISR_CONFIG)
            if not self.interrupt_status:
                self._lower()
        elif addr == STATUS:
            self.write_status(value)
        elif addr == SHM_SEL:
            self.shm_select = value
        elif addr in (QUEUE_NUM, QUEUE_READY, QUEUE_RESET) or addr & ~7 in _QUEUE_ADDRS:
            if vq is None:
                self._ignored("no-such-queue", f"QueueSel {self.queue_select} of {len(self.queues)}")
            elif addr == QUEUE_NUM:
                if vq.enabled:
                    self._ignored("queue-enabled", f"queue {vq.index} QueueNum written while ready")
                else:
                    vq.size = value  # checked when the queue is made ready
            elif addr == QUEUE_READY:
                if value == 1 and not vq.enabled:
                    self.enable_queue(vq)
                elif value == 0:
                    vq.reset()  # as QEMU's virtio-mmio: the queue and its addresses forgotten
            elif addr == QUEUE_RESET:
                if value == 1:
                    vq.reset()
            else:
                lo = addr & ~7
                self.set_queue_address(vq, _QUEUE_ADDRS[lo], addr - lo, 4, value)
        else:
            self._ignored("bad-mmio-access", f"write of {value:#x} to read-only or reserved register {addr:#x}")
