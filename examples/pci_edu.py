"""pci_edu: a PCI device in the spirit of QEMU's ``edu`` teaching device (1234:11e8).

It emulates one PCI function: config space with the ids, COMMAND/STATUS, a 1 MiB
MMIO BAR0 the guest sizes and moves (the BAR's range is mapped into the ioreq
server and unmapped as the guest programs it), an MSI capability, and behind BAR0
registers that compute something:

====== ==== ==============================================================
0x00   RO   identification 0x010000ed (version 1.0, "ed"u)
0x04   RW   liveness check: reads back the bitwise NOT of what was written
0x08   RW   factorial: write n, read n! (modulo 2**32)
0x20   RW   status: bit 0 "computing" (RO), bit 7 "interrupt when the factorial is done"
0x24   RO   interrupt status (the bits that raised the interrupt)
0x60   WO   raise interrupt: the value is ORed into the interrupt status
0x64   WO   acknowledge: the value is cleared from the interrupt status
0x80   RW   DMA source, 0x88 DMA destination, 0x90 DMA count (bytes)
0x98   RW   DMA command: bit 0 start, bit 1 direction (0 RAM -> device, 1 device -> RAM),
            bit 2 interrupt 0x100 when done
====== ==== ==============================================================

Interrupts go out as MSI (``inject_msi``, address and data from the capability)
when the guest enabled MSI, else as INTA# (``set_pci_intx_level``, lowered when the
guest acknowledges the last bit).  The DMA engine's 4 KiB buffer sits at device
address 0x40000; every guest-memory access goes through the server's bounds-checked
guest mapping, and a transfer outside the buffer, the 28-bit DMA window or the
guest's RAM is refused (the guest is untrusted) instead of crashing the device model.

Run it:

    python examples/pci_edu.py                # on the mock Xen: a simulated guest enumerates
                                              # the bus, programs the BAR and uses the device
    python examples/pci_edu.py --hold         # the same, then serve until Ctrl-C
    python examples/pci_edu.py --domid 5      # on a real dom0: serve HVM domain 5 until Ctrl-C
    python examples/pci_edu.py --domid 5 --depriv 990:990 --chroot /var/empty
    XENDMOP_MOCK_SOCKET=/run/mock.sock python examples/pci_edu.py --domid 1 --depriv 990:990
                                              # domain 1 of a mock host process (xendmop mock-host)

The device sits at 0000:00:<--slot>.0; on a real dom0 start the device model while
the domain is still paused so the guest's firmware finds it.  Once the server is up
``pci_edu: serving domN's edu at 0000:00:04.0; Ctrl-C to stop`` goes to stderr.  Ctrl-C or
SIGTERM tears the ioreq server down (no server is left in Xen) and exits 0, as after
``--hold`` on the mock (``--help`` lists the statuses).  ``--depriv UID:GID`` restricts
every handle to the domain and drops to that user after bring-up; it needs a real
dom0 or a mock host in another process (the in-process mock shares this process, so
it refuses the flag).  With ``XENDMOP_MOCK_SOCKET`` set, ``--domid`` serves that mock
host's domain, and ``guest_script`` can drive it from a third process (``RemoteGuest``).

HAZARD: never issue interrupt DMOPs to a PVH guest — on Xen 4.17.7 an accepted ISA
IRQ level change crashed the hypervisor.  Xen's DMOP checks cannot tell PVH from
HVM (both are "HVM" to ``dm_op``), so before serving this example asks the
hypervisor (libxenctrl), else libxl's record (``xenstore-read /libxl/<domid>/type``),
and refuses any domain that is not "hvm"; when neither can tell it refuses too,
unless ``--assume-hvm`` is given (``xendmop.runtime.dm_program.require_hvm``).  On a mock
host process a PV domain is refused by the EINVAL its first DMOP gets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xendmop.runtime import Bar, PciFunction, ServeLoop, dm_program
from xendmop.runtime.dispatch import GuestMemory, GuestMemoryError, RateLimitedLog

log = logging.getLogger("pci_edu")

VENDOR_ID, DEVICE_ID = 0x1234, 0x11E8  # QEMU's edu
CLASS_OTHER = 0xFF0000  # PCI_CLASS_OTHERS, as QEMU's edu
REVISION = 0x10
BAR0_SIZE = 1 << 20
IDENTIFICATION = 0x010000ED

REG_ID, REG_LIVENESS, REG_FACTORIAL = 0x00, 0x04, 0x08
REG_STATUS, REG_IRQ_STATUS, REG_IRQ_RAISE, REG_IRQ_ACK = 0x20, 0x24, 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQ_FACTORIAL = 0x01, 0x80
FACTORIAL_IRQ, DMA_IRQ = 0x001, 0x100
DMA_START, DMA_TO_RAM, DMA_IRQ_WHEN_DONE = 0x1, 0x2, 0x4
DMA_BUFFER, DMA_BUFFER_SIZE = 0x40000, 4096
DMA_MASK = (1 << 28) - 1  # QEMU's edu has a 28-bit DMA engine
#: n! modulo 2**32 is 0 from here on (34! has 32 factors of two): the loop stays bounded.
FACTORIAL_ZERO_FROM = 34
MASK32 = 0xFFFFFFFF


def factorial32(n: int) -> int:
    """``n!`` modulo 2**32, in at most 33 multiplications whatever ``n`` is."""
    if n >= FACTORIAL_ZERO_FROM:
        return 0
    result = 1
    for k in range(2, n + 1):
        result = result * k & MASK32
    return result


class Edu:
    """The edu function: ``pci`` is its config space (add it with ``IoreqServer.add_pci``);
    the object itself is BAR0's register block (offsets from the BAR's base).

    ``memory`` returns the guest memory DMA goes through (the server's bounds-checked
    mapping, ``IoreqServer.dispatcher.memory``), or None when there is none yet.
    """

    def __init__(self, memory: Callable[[], GuestMemory | None] = lambda: None) -> None:
        self.pci = PciFunction(
            VENDOR_ID, DEVICE_ID, CLASS_OTHER, revision=REVISION, bars=[Bar(BAR0_SIZE, self)], msi=True
        )
        self.memory = memory
        self.liveness = 0
        self.factorial = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.dma_buffer = bytearray(DMA_BUFFER_SIZE)
        self.refused: list[str] = []  # why DMA transfers were refused (newest last, bounded)
        self._warn = RateLimitedLog(log)

    # --- BAR0: IoDevice -------------------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        if not self._valid(addr, size):
            return (1 << (8 * size)) - 1  # as QEMU's edu: wrong-sized reads see all-ones
        value = {
            REG_ID: IDENTIFICATION,
            REG_LIVENESS: ~self.liveness & MASK32,
            REG_FACTORIAL: self.factorial,
            REG_STATUS: self.status,
            REG_IRQ_STATUS: self.irq_status,
            REG_DMA_SRC: self.dma_src,
            REG_DMA_DST: self.dma_dst,
            REG_DMA_COUNT: self.dma_count,
            REG_DMA_CMD: self.dma_cmd,
        }.get(addr, 0)
        return value & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        if not self._valid(addr, size):
            return
        if addr == REG_LIVENESS:
            self.liveness = value & MASK32
        elif addr == REG_FACTORIAL:
            if not self.status & STATUS_COMPUTING:
                self._compute_factorial(value & MASK32)
        elif addr == REG_STATUS:
            self.status = (self.status & ~STATUS_IRQ_FACTORIAL) | (value & STATUS_IRQ_FACTORIAL)
        elif addr == REG_IRQ_RAISE:
            self.raise_irq(value & MASK32)
        elif addr == REG_IRQ_ACK:
            self.lower_irq(value & MASK32)
        elif addr == REG_DMA_SRC:
            self.dma_src = value
        elif addr == REG_DMA_DST:
            self.dma_dst = value
        elif addr == REG_DMA_COUNT:
            self.dma_count = value
        elif addr == REG_DMA_CMD:
            self.dma_cmd = value & (DMA_START | DMA_TO_RAM | DMA_IRQ_WHEN_DONE)
            if self.dma_cmd & DMA_START:
                self._run_dma()

    @staticmethod
    def _valid(addr: int, size: int) -> bool:
        """32-bit accesses below 0x80, 32- or 64-bit ones to the DMA registers (as QEMU's edu)."""
        return size == 4 if addr < REG_DMA_SRC else size in (4, 8)

    # --- what the registers do ---------------------------------------------------------------

    def _compute_factorial(self, n: int) -> None:
        # QEMU computes in a thread; bounded at 33 steps it is quick enough to do inline,
        # so the guest always sees "computing" clear by its next read.
        self.status |= STATUS_COMPUTING
        self.factorial = factorial32(n)
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQ_FACTORIAL:
            self.raise_irq(FACTORIAL_IRQ)

    def raise_irq(self, bits: int) -> None:
        """OR ``bits`` into the interrupt status and signal: MSI if enabled, else INTA#."""
        self.irq_status |= bits
        if not self.irq_status:
            return
        if not self.pci.notify_msi():
            self.pci.set_irq(True)

    def lower_irq(self, bits: int) -> None:
        """Clear ``bits``; INTA# drops once nothing is left.  MSI is an edge with nothing to
        lower, but a line raised before the guest switched to MSI still drops here (QEMU's
        edu would leave it asserted); lowering a line that is low sends nothing."""
        self.irq_status &= ~bits
        if not self.irq_status:
            self.pci.set_irq(False)

    def _refuse(self, why: str) -> None:
        self.refused = [*self.refused[-15:], why]
        self._warn(logging.WARNING, "dma refused", "DMA refused: %s", why)

    def _run_dma(self) -> None:
        """One transfer, checked before any byte moves; the command's start bit clears either way."""
        to_ram = bool(self.dma_cmd & DMA_TO_RAM)
        guest_addr, device_addr = (self.dma_dst, self.dma_src) if to_ram else (self.dma_src, self.dma_dst)
        count = self.dma_count
        self.dma_cmd &= ~DMA_START
        offset = device_addr - DMA_BUFFER
        if count == 0:
            return self._refuse("count 0: nothing to transfer")
        if not 0 <= offset <= DMA_BUFFER_SIZE - count or count > DMA_BUFFER_SIZE:
            return self._refuse(f"device range {device_addr:#x}+{count:#x} outside the buffer")
        if guest_addr & ~DMA_MASK or (guest_addr + count - 1) & ~DMA_MASK:
            return self._refuse(f"guest address {guest_addr:#x}+{count:#x} outside the 28-bit DMA window")
        memory = self.memory()
        if memory is None:
            return self._refuse("no guest memory mapping")
        try:
            if to_ram:
                memory.write(guest_addr, bytes(self.dma_buffer[offset : offset + count]))
            else:
                self.dma_buffer[offset : offset + count] = memory.read(guest_addr, count)
        except GuestMemoryError as e:
            return self._refuse(f"guest address {guest_addr:#x}+{count:#x}: {e}")
        if self.dma_cmd & DMA_IRQ_WHEN_DONE:
            self.raise_irq(DMA_IRQ)


# --- the guest's side, on the mock -----------------------------------------------------------------

PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x2, 0x4
PCI_STATUS_CAP_LIST, PCI_CAP_ID_MSI = 0x10, 0x05
MSI_ADDRESS = 0xFEE00000  # the local APIC's MSI window, destination APIC 0
MSI_VECTOR = 0x41  # fixed delivery, vector 0x41
BAR0_FIRST, BAR0_MOVED = 0xE0000000, 0xE0100000


@dataclass
class GuestReport:
    """What the simulated guest found and saw, step by step."""

    found_slots: list[int] = field(default_factory=list)
    edu_slot: int | None = None
    bar0_size: int = 0
    identification: int = 0
    liveness: int = 0
    factorial_10: int = 0
    intx_asserted: bool = False
    irq_status: int = 0
    intx_after_ack: bool = True
    msi: tuple[int, int] | None = None
    dma_roundtrip: bool = False
    old_bar_after_move: int = 0
    new_bar_after_move: int = 0
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)


def _sbdf(slot: int) -> int:
    return slot << 3  # segment 0, bus 0, function 0


def guest_script(guest: Any, domain_state: Callable[[], dict[str, Any]]) -> GuestReport:
    """What a guest's PCI driver does, as config and MMIO accesses of one vCPU.

    ``guest``: a ``SimGuest`` (or a ``RemoteGuest`` of a mock host process);
    ``domain_state()``: the mock's snapshot of the domain, where the interrupts show.
    """
    r = GuestReport()
    for slot in range(32):  # absent functions read all-ones
        ids = guest.pci_config_read(_sbdf(slot), 0x00, 4)
        if ids != 0xFFFFFFFF:
            r.found_slots.append(slot)
            if ids == DEVICE_ID << 16 | VENDOR_ID:
                r.edu_slot = slot
    if r.edu_slot is None:
        raise RuntimeError(f"no {VENDOR_ID:04x}:{DEVICE_ID:04x} on bus 0 (found slots {r.found_slots})")
    sbdf = _sbdf(r.edu_slot)
    r.say(f"found {VENDOR_ID:04x}:{DEVICE_ID:04x} at 00:{r.edu_slot:02x}.0")

    guest.pci_config_write(sbdf, 0x10, 4, 0xFFFFFFFF)  # size BAR0: write all-ones, read the mask
    mask = guest.pci_config_read(sbdf, 0x10, 4) & ~0xF
    r.bar0_size = (~mask & 0xFFFFFFFF) + 1
    guest.pci_config_write(sbdf, 0x10, 4, BAR0_FIRST)
    command = guest.pci_config_read(sbdf, 0x04, 2)
    guest.pci_config_write(sbdf, 0x04, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    r.say(f"BAR0: {r.bar0_size >> 10} KiB MMIO, programmed at {BAR0_FIRST:#x}")

    r.identification = guest.mmio_read(BAR0_FIRST + REG_ID, 4)
    guest.mmio_write(BAR0_FIRST + REG_LIVENESS, 4, 0x12345678)
    r.liveness = guest.mmio_read(BAR0_FIRST + REG_LIVENESS, 4)
    r.say(f"identification {r.identification:#010x}, liveness 0x12345678 -> {r.liveness:#010x}")

    # A factorial with an interrupt at the end: INTA#, since MSI is still off.
    guest.mmio_write(BAR0_FIRST + REG_STATUS, 4, STATUS_IRQ_FACTORIAL)
    guest.mmio_write(BAR0_FIRST + REG_FACTORIAL, 4, 10)
    while guest.mmio_read(BAR0_FIRST + REG_STATUS, 4) & STATUS_COMPUTING:
        pass
    r.factorial_10 = guest.mmio_read(BAR0_FIRST + REG_FACTORIAL, 4)
    intx_bit = 1 << (r.edu_slot * 4)  # INTA# of this slot in the mock's PCI INTx bitmap
    r.intx_asserted = bool(domain_state()["irq"][1] & intx_bit)
    r.irq_status = guest.mmio_read(BAR0_FIRST + REG_IRQ_STATUS, 4)
    guest.mmio_write(BAR0_FIRST + REG_IRQ_ACK, 4, r.irq_status)
    r.intx_after_ack = bool(domain_state()["irq"][1] & intx_bit)
    r.say(f"10! = {r.factorial_10}; INTx {'asserted' if r.intx_asserted else 'NOT asserted'}, then acknowledged")

    # MSI: walk the capability list to the MSI capability, program it, enable it.
    if guest.pci_config_read(sbdf, 0x06, 2) & PCI_STATUS_CAP_LIST:
        cap = guest.pci_config_read(sbdf, 0x34, 1) & ~3
        while cap and guest.pci_config_read(sbdf, cap, 1) != PCI_CAP_ID_MSI:
            cap = guest.pci_config_read(sbdf, cap + 1, 1) & ~3
        if cap:
            guest.pci_config_write(sbdf, cap + 4, 4, MSI_ADDRESS)
            guest.pci_config_write(sbdf, cap + 8, 4, 0)
            guest.pci_config_write(sbdf, cap + 12, 2, MSI_VECTOR)
            guest.pci_config_write(sbdf, cap + 2, 2, guest.pci_config_read(sbdf, cap + 2, 2) | 1)
            before = len(domain_state()["msis"])
            guest.mmio_write(BAR0_FIRST + REG_IRQ_RAISE, 4, 0x42)
            msis = domain_state()["msis"]
            r.msi = (int(msis[-1][0]), int(msis[-1][1])) if len(msis) > before else None
            guest.mmio_write(BAR0_FIRST + REG_IRQ_ACK, 4, 0x42)
    r.say(f"MSI: address {r.msi[0]:#x} data {r.msi[1]:#x}" if r.msi else "MSI: none delivered")

    # DMA: guest RAM -> device buffer -> elsewhere in guest RAM.
    pattern = bytes(range(256)) * 2
    guest.write_ram(0x10000, pattern)
    for reg, value in ((REG_DMA_SRC, 0x10000), (REG_DMA_DST, DMA_BUFFER), (REG_DMA_COUNT, len(pattern))):
        guest.mmio_write(BAR0_FIRST + reg, 8, value)
    guest.mmio_write(BAR0_FIRST + REG_DMA_CMD, 8, DMA_START)
    for reg, value in ((REG_DMA_SRC, DMA_BUFFER), (REG_DMA_DST, 0x20000)):
        guest.mmio_write(BAR0_FIRST + reg, 8, value)
    guest.mmio_write(BAR0_FIRST + REG_DMA_CMD, 8, DMA_START | DMA_TO_RAM)
    r.dma_roundtrip = guest.read_ram(0x20000, len(pattern)) == pattern
    r.say(f"DMA round trip of {len(pattern)} bytes: {'ok' if r.dma_roundtrip else 'MISMATCH'}")

    guest.pci_config_write(sbdf, 0x10, 4, BAR0_MOVED)  # move the BAR while it decodes
    r.old_bar_after_move = guest.mmio_read(BAR0_FIRST + REG_ID, 4)
    r.new_bar_after_move = guest.mmio_read(BAR0_MOVED + REG_ID, 4)
    r.say(
        f"BAR0 moved to {BAR0_MOVED:#x}: old address reads {r.old_bar_after_move:#010x}, "
        f"new reads {r.new_bar_after_move:#010x}"
    )
    return r


def run_on_mock(*, slot: int = 4, hold: bool = False, out: Callable[[str], None] = print) -> GuestReport | None:
    """Serve a simulated guest on the mock Xen and run ``guest_script`` against the device.

    The loop runs in this thread (so Ctrl-C/SIGTERM reach it when this is the main
    thread), the guest in another.  With ``hold`` the device keeps serving after the
    script until a signal.  Returns None when a signal ended the run before the script
    finished; raises what the script raised, or ``RuntimeError`` if a server is left behind.
    """
    from xendmop.mock.simguest import SimGuest

    with dm_program.open_mock() as mock:
        server = mock.ioreq_server()
        edu = Edu(lambda: server.dispatcher.memory)
        server.add_pci(edu.pci, slot=slot, name="edu")

        def guest() -> GuestReport:
            xen = mock.mock_xen
            return guest_script(SimGuest(xen, mock.domid, timeout=5), xen.domain(mock.domid).snapshot)

        return dm_program.run_guest_script(
            mock, ServeLoop(server), guest, lines=lambda report: report.lines, hold=hold, out=out
        )


# --- a real dom0 -----------------------------------------------------------------------------


def serve_domain(connection: dm_program.Connection, slot: int = 4) -> int:
    """Serve the edu device at ``slot`` of the connection's domain (a real dom0's, or a mock
    host process's) until SIGINT/SIGTERM; the server is destroyed on the way out."""
    server = connection.ioreq_server()
    edu = Edu(lambda: server.dispatcher.memory)
    server.add_pci(edu.pci, slot=slot, name="edu")

    def ready() -> None:  # only once the server is up: a refused domain is never announced
        drop = connection.drop
        dropped = f"; deprivileged to uid {drop.uid} gid {drop.gid}" if drop else ""
        print(
            f"pci_edu: serving dom{connection.domid}'s edu at 0000:00:{slot:02x}.0{dropped}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )

    signum = dm_program.serve_until_signal(ServeLoop(server), on_ready=ready)
    print(dm_program.stopped_line("pci_edu", signum), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=dm_program.EXIT_STATUS_HELP)
    dm_program.add_arguments(p, hold=True, assume_hvm=True)
    p.add_argument("--slot", type=int, default=4, choices=range(1, 32), metavar="1..31", help="PCI slot on bus 0")
    args, target = dm_program.parse(p, argv)
    if target.where is dm_program.Where.MOCK:
        run_on_mock(slot=args.slot, hold=args.hold)
        return 0
    # Interrupts go out (INTx, MSI): a domain that is not HVM is refused before anything is opened.
    return dm_program.run_target(
        target, lambda connection: serve_domain(connection, args.slot), name="pci_edu", parser=p, hvm_only=True
    )


if __name__ == "__main__":
    sys.exit(main())
