"""``PciFunction``: a type-0 PCI configuration space for devices written in Python.

It answers config reads and writes (an ``IoDevice`` for ``IOREQ_TYPE_PCI_CONFIG``)
with the standard header: ids, command/status, class, header type, six BARs the
guest sizes and moves, interrupt line/pin and an optional MSI capability.  When
the guest enables decoding or moves a BAR, it asks its host (the ``IoreqServer``
it was added to) to map or unmap the BAR's range — in Xen and in the dispatcher —
and it raises INTx and MSI through the host's DMOPs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .dispatch import IoDevice

log = logging.getLogger("xendmop.runtime")

CONFIG_SIZE = 256
PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_REVISION_ID, PCI_CLASS_PROG, PCI_HEADER_TYPE = 0x08, 0x09, 0x0E
PCI_BASE_ADDRESS_0, PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBSYSTEM_ID = 0x10, 0x2C, 0x2E
PCI_CAPABILITY_LIST, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN = 0x34, 0x3C, 0x3D
PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_COMMAND_INTX_DISABLE = 0x1, 0x2, 0x400
PCI_STATUS_INTERRUPT, PCI_STATUS_CAP_LIST = 0x08, 0x10
PCI_CAP_ID_MSI = 0x05
PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_64BIT = 0x1, 0x80
MSI_CAP = 0x40  # where this helper puts its MSI capability
#: BAR low bits: bit 0 = I/O space; bit 3 = prefetchable (memory)
BAR_IO, BAR_PREFETCH = 0x1, 0x8


@dataclass
class Bar:
    """One 32-bit BAR: ``size`` (a power of two), I/O or memory, and the device behind it
    (called with offsets from the BAR's base)."""

    size: int
    device: IoDevice
    io: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        low = 4 if self.io else 16
        if self.size < low or self.size & (self.size - 1) or self.size > 1 << 31:
            raise ValueError(f"BAR size {self.size:#x} must be a power of two in {low}..2 GiB")

    @property
    def flags(self) -> int:
        return BAR_IO if self.io else (BAR_PREFETCH if self.prefetchable else 0)


class PciHost(Protocol):
    """What a ``PciFunction`` needs from the server it was added to."""

    def map_bar(self, fn: PciFunction, index: int, start: int) -> None: ...

    def unmap_bar(self, fn: PciFunction, index: int, start: int) -> None: ...

    def set_intx(self, fn: PciFunction, level: bool) -> None: ...

    def inject_msi(self, fn: PciFunction, addr: int, data: int) -> None: ...


class PciFunction:
    """Config space of one function.  Writable bits follow the PCI spec for a type-0
    header; everything else is read-only.  ``bars`` indexes BAR0.. (``None`` for unused).
    An id, class or pin that does not fit its register raises ``ValueError`` naming it."""

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        bars: list[Bar | None] | None = None,
        interrupt_pin: int = 1,
        msi: bool = False,
    ) -> None:
        for field_name, value, bits in (
            ("vendor_id", vendor_id, 16),
            ("device_id", device_id, 16),
            ("class_code", class_code, 24),
            ("revision", revision, 8),
            ("subsystem_vendor_id", subsystem_vendor_id, 16),
            ("subsystem_id", subsystem_id, 16),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise ValueError(f"{field_name}={value!r}: must be an integer in 0..{(1 << bits) - 1:#x}")
        if isinstance(interrupt_pin, bool) or interrupt_pin not in range(5):
            raise ValueError(f"interrupt_pin={interrupt_pin!r}: must be 0 (none) or 1..4 (INTA#..INTD#)")
        given = list(bars or [])
        if len(given) > 6:
            raise ValueError("a type-0 header has six BARs")
        self.bars: list[Bar | None] = given + [None] * (6 - len(given))
        self.cfg = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.host: PciHost | None = None
        self.sbdf: int | None = None
        self._mapped: dict[int, int] = {}  # BAR index -> base currently mapped
        self._intx_level = False
        self._intx_driven = False  # what the guest's interrupt controller last saw
        self._put(PCI_VENDOR_ID, 2, vendor_id)
        self._put(PCI_DEVICE_ID, 2, device_id)
        self._put(PCI_REVISION_ID, 1, revision)
        self._put(PCI_CLASS_PROG, 3, class_code)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self._wm(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | 0x4 | PCI_COMMAND_INTX_DISABLE)
        self._wm(PCI_INTERRUPT_LINE, 1, 0xFF)
        for i, bar in enumerate(self.bars):
            if bar is not None:
                self._put(PCI_BASE_ADDRESS_0 + 4 * i, 4, bar.flags)
                self._wm(PCI_BASE_ADDRESS_0 + 4 * i, 4, ~(bar.size - 1) & 0xFFFFFFFF)
        if msi:
            self._put(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
            self._put(PCI_CAPABILITY_LIST, 1, MSI_CAP)
            self._put(MSI_CAP, 1, PCI_CAP_ID_MSI)
            self._put(MSI_CAP + 2, 2, PCI_MSI_FLAGS_64BIT)
            self._wm(MSI_CAP + 2, 2, PCI_MSI_FLAGS_ENABLE)
            self._wm(MSI_CAP + 4, 4, 0xFFFFFFFC)
            self._wm(MSI_CAP + 8, 4, 0xFFFFFFFF)
            self._wm(MSI_CAP + 12, 2, 0xFFFF)

    # --- raw config space --------------------------------------------------------------

    def _get(self, reg: int, size: int) -> int:
        return int.from_bytes(self.cfg[reg : reg + size], "little")

    def _put(self, reg: int, size: int, value: int) -> None:
        self.cfg[reg : reg + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _wm(self, reg: int, size: int, mask: int) -> None:
        self.wmask[reg : reg + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    # --- IoDevice: config cycles ----------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        if addr + size > CONFIG_SIZE:
            return 0  # extended config space of a conventional function
        return self._get(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        if addr + size > CONFIG_SIZE:
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            m = self.wmask[addr + i]
            self.cfg[addr + i] = (self.cfg[addr + i] & ~m) | (byte & m)
        touches_command = addr < PCI_COMMAND + 2 and addr + size > PCI_COMMAND
        if touches_command or PCI_BASE_ADDRESS_0 <= addr < PCI_BASE_ADDRESS_0 + 24:
            self.update_mappings()
        if touches_command:
            self._drive_intx()

    # --- BARs --------------------------------------------------------------------------------

    def bar_base(self, index: int) -> int | None:
        """The base the guest programmed into BAR ``index``, or None when it does not decode."""
        bar = self.bars[index]
        if bar is None:
            return None
        command = self._get(PCI_COMMAND, 2)
        if not command & (PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY):
            return None
        base = self._get(PCI_BASE_ADDRESS_0 + 4 * index, 4) & ~(bar.size - 1) & 0xFFFFFFFF
        # A BAR at 0 or one still holding the sizing pattern does not decode.
        if base == 0 or base == ~(bar.size - 1) & 0xFFFFFFFF:
            return None
        if bar.io and base + bar.size > 0x10000:
            return None
        return base

    def update_mappings(self) -> None:
        """Unmap BARs that moved or stopped decoding, then map where they decode now."""
        if self.host is None:
            return
        wanted = {i: b for i in range(6) if (b := self.bar_base(i)) is not None}
        for i, old in list(self._mapped.items()):
            if wanted.get(i) != old:
                del self._mapped[i]
                self.host.unmap_bar(self, i, old)
        for i, base in wanted.items():
            if i not in self._mapped:
                self.host.map_bar(self, i, base)
                self._mapped[i] = base

    def unmap_all(self) -> None:
        """Remove every BAR mapping (the function is being removed)."""
        host, mapped, self._mapped = self.host, self._mapped, {}
        if host is not None:
            for i, base in mapped.items():
                host.unmap_bar(self, i, base)

    @property
    def mapped_bars(self) -> dict[int, int]:
        return dict(self._mapped)

    # --- interrupts -------------------------------------------------------------------------------

    def set_irq(self, level: bool) -> None:
        """Drive the function's INTx line (the status bit follows; the command's
        INTx-disable bit gates what reaches the guest)."""
        self._intx_level = bool(level)
        status = self._get(PCI_STATUS, 2)
        self._put(PCI_STATUS, 2, status | PCI_STATUS_INTERRUPT if level else status & ~PCI_STATUS_INTERRUPT)
        self._drive_intx()

    def _drive_intx(self) -> None:
        if self.host is None or not self._get(PCI_INTERRUPT_PIN, 1):
            return
        enabled = not self._get(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
        level = self._intx_level and enabled
        if level != self._intx_driven:  # Xen counts assertions per line: send edges only
            self.host.set_intx(self, level)
            self._intx_driven = level

    @property
    def msi_enabled(self) -> bool:
        return self._get(MSI_CAP, 1) == PCI_CAP_ID_MSI and bool(self._get(MSI_CAP + 2, 2) & PCI_MSI_FLAGS_ENABLE)

    def notify_msi(self) -> bool:
        """Send the MSI the guest programmed; False (nothing sent) when MSI is off."""
        if self.host is None or not self.msi_enabled:
            return False
        addr = self._get(MSI_CAP + 4, 4) | self._get(MSI_CAP + 8, 4) << 32
        self.host.inject_msi(self, addr, self._get(MSI_CAP + 12, 2))
        return True
