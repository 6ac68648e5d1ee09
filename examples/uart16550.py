"""uart16550: a 16550A serial port (COM1: ports 0x3F8-0x3FF, ISA IRQ 4), the main job.

Every register of the National Semiconductor PC16550D: RBR/THR and the divisor latch
(DLAB), IER, IIR/FCR with 16-byte receive and transmit FIFOs and the four receive
trigger levels, LCR, MCR with loopback, LSR (DR, OE, THRE, TEMT), MSR with its delta
bits, SCR.  Interrupts are prioritised as in the datasheet (line status > received
data or character timeout > THR empty > modem status) and reach the guest as ISA
IRQ 4 through ``set_isa_irq_level`` — only on an edge, and only while MCR.OUT2 is
set, as on a PC where OUT2 gates the UART's interrupt line (Linux's 8250 driver sets
it for this reason).

Run it:

    python examples/uart16550.py                 # on the mock Xen: a simulated guest firmware drives the UART
    python examples/uart16550.py --line "hi"     # ... and types "hi" to it (default: asks on a terminal)
    python examples/uart16550.py --domid 5       # on a real dom0: HVM domain 5's COM1 on this terminal
    python examples/uart16550.py --domid 5 --pty # ... on a new pty instead (its path is printed)

On the mock, the guest "firmware" does what a real driver does — probes the scratch
register and loopback, sets 115200 8N1 through the divisor latch, enables the FIFOs,
tests the THRE interrupt, writes a banner, then takes a line of input by interrupt
and writes it back — and you see its console output and every edge of IRQ 4
(``[irq4 ↑ RX data]``).  On a real dom0 the terminal is put in raw mode (restored on
exit; Ctrl-C still stops the device model) and is the guest's serial console.
Either way the ioreq server is destroyed on exit, also on Ctrl-C and SIGTERM, which
are the ordinary way to stop it and exit 0 (``--help`` lists the statuses).

HAZARD: ``set_isa_irq_level`` must only reach an HVM guest: on Xen 4.17.7 an
accepted ISA IRQ level change for a PVH guest crashed the hypervisor, and ``dm_op``
cannot tell PVH from HVM.  Before serving, the guest's kind is read from the
hypervisor's emulation flags (libxenctrl), else from libxl's record
(``xenstore-read /libxl/<domid>/type``), and any domain that is not "hvm" is
refused; an unknown kind is refused too unless ``--assume-hvm`` is given
(``xendmop.runtime.dm_program.require_hvm``).  On the mock the domain view says whether
it is HVM.

``--depriv UID:GID`` drops privileges after bring-up (``IoreqServer(deprivilege=)``).
It needs a real dom0, or a mock host in another process: with ``XENDMOP_MOCK_SOCKET``
set (``xendmop mock-host --socket PATH``), ``--domid N`` serves that host's domain N
(a PV one refuses the DMOPs, the mock has no PVH); the in-process mock lives in this
very process, which cannot drop its privileges.

A crash does not take the guest down (``--state-dir [DIR]``, default ``/run/xendmop``, with
``--domid N``).  How to use it:

    python examples/uart16550.py --domid 5 --state-dir      # serves; keeps dom5-uart16550.state
    kill -9 <pid>                                            # the guest's vCPU waits, its server stays
    python examples/uart16550.py --domid 5 --state-dir      # "taking over ioreq server 0 ...": it goes on

The file holds the ioreq server's id (recorded as soon as Xen gives it) and, after every
access, every register, both FIFOs and the IRQ line's level (``STATE_LAYOUT``), stored in
place in a mapped file (about 1 us per access, no syscall) and double-buffered, so a kill in
the middle of a store leaves the previous state whole.  Started again, the device model takes
the server over if Xen still has it (``xendmop.runtime.restart``), answers the access a vCPU
was waiting on, sends what the transmitter held, and the guest's 8250 driver finds the UART as
it left it, its THRE interrupts still coming.  Guaranteed: nothing the guest was told was sent
is lost — a byte written to THR is reported sent (LSR THRE/TEMT, the THRE interrupt) only once
it was handed to the output and then removed from the FIFO by a store, one byte at a time, so
a kill between the two repeats that one byte, never more.  An access the dead device model had
taken but not answered is carried out again: a THR write caught so is also repeated (one
byte), an RBR read so caught loses the character it had popped.  Typed input not yet in the
receive FIFO was in the dead process and is gone.  A clean stop (SIGINT, SIGTERM) destroys the
server and removes the file (empties it, when a --chroot or --depriv makes it unreachable); a
record whose server or domain is gone is replaced, said in one line; a second device model for
the same domain is refused while the first one runs (the file's lock).  Works with --depriv and
--chroot: the file is opened before the privilege drop.

A simplification: time passes between two guest accesses.  The transmitter sends
what the TX FIFO holds before any access other than a THR write (and when the serve
loop gets to it), and the 4-character-time receive timeout has always run out when
the guest next looks.  The line itself is perfect: no parity, framing or break errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import select
import struct
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from xendmop import DeviceModel
from xendmop.runtime import ServeLoop, dm_program

if TYPE_CHECKING:
    from xendmop.mock import MockXen
    from xendmop.runtime.restart import DeviceState

log = logging.getLogger("uart16550")

COM1 = 0x3F8
IRQ = 4
FIFO_SIZE = 16
#: the 1.8432 MHz crystal divided by 16: the baud rate with divisor 1
BASE_BAUD = 115200
#: ``--state-dir`` without a value (tmpfs: the state goes with the host, as Xen's servers do)
DEFAULT_STATE_DIR = "/run/xendmop"

# Register offsets (PC16550D Table II); DLL/DLM replace RBR/THR/IER while LCR.DLAB is set.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_FIFOS = 0x01, 0xC0
IIR_LINE_STATUS, IIR_RX_DATA, IIR_RX_TIMEOUT, IIR_THRE, IIR_MODEM = 0x06, 0x04, 0x0C, 0x02, 0x00
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
#: FCR bits 7:6 → receive FIFO trigger level
RX_TRIGGER = (1, 4, 8, 14)

#: The UART as its restart state keeps it (``xendmop.runtime.restart``): a layout version,
#: IER, LCR, MCR, SCR, FCR, the divisor, OE, the THRE interrupt, the modem inputs and deltas,
#: the IRQ line's level, then each FIFO as a count and 16 bytes.  Typed input not yet in the
#: receive FIFO (``pending_input``) is host-side and not kept.
STATE_LAYOUT = struct.Struct("<BBBBBBHBBBBBB16sB16s")
STATE_VERSION = 1

SOURCE_NAMES = {
    IIR_LINE_STATUS: "line status",
    IIR_RX_DATA: "RX data",
    IIR_RX_TIMEOUT: "RX timeout",
    IIR_THRE: "THRE",
    IIR_MODEM: "modem status",
}


class Uart16550:
    """The register model of one 16550A.

    ``output(data)``: bytes the UART puts on the line (not called in loopback).
    ``set_irq(level, source)``: the PC's IRQ line changed — called on edges only;
    ``source`` names the interrupt that raised it ("" when lowered).
    The line is infinitely fast (as QEMU's): a byte written to THR goes to ``output``
    during the write, so the transmitter is empty again before the access ends.

    Host side: ``receive(data)`` — characters arrive on the line now (they can
    overrun the FIFO); ``queue_input(data)`` — characters arrive no faster than the
    guest reads them, as typed on a terminal; ``set_modem_inputs``.  Every entry point
    takes the UART's lock, so the serve loop and the host side may run in different
    threads.

    ``state`` (a restart state's ``DeviceState``): every entry point ends by storing all
    the registers, both FIFOs and the IRQ line's level there (one ``pack_into``, no
    syscall); ``restore()`` reads them back in a restarted device model.  Then a byte
    written to THR is reported sent (LSR THRE/TEMT, the THRE interrupt) only once it was
    handed to ``output`` and the store that removed it from the FIFO was made: a device
    model killed at any point restarts with every byte the guest was told was sent already
    out, and every other one still in its FIFO.
    """

    def __init__(
        self,
        output: Callable[[bytes], None],
        set_irq: Callable[[bool, str], None] | None = None,
        *,
        state: DeviceState | None = None,
    ) -> None:
        self.output = output
        self.set_irq = set_irq
        #: where every register is stored after each access, for a restarted device model
        #: (``restore``); with it the transmitter hands the line one byte at a time
        self.state = state
        self._lock = threading.RLock()
        self.rx: deque[int] = deque()
        self.tx: deque[int] = deque()
        self.pending_input: deque[int] = deque()
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.fcr = 0  # FIFO enable, DMA mode and trigger bits as last programmed
        self.divisor = 12  # 9600 baud, as a PC BIOS leaves it
        self.overrun = False
        self.thr_ipending = False
        self.modem_inputs = MSR_CTS | MSR_DSR | MSR_DCD  # a terminal is attached
        self.msr_delta = 0
        self.irq_level = False

    # --- derived state ----------------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def capacity(self) -> int:
        """Characters a direction holds: the FIFO, or the single RBR/THR without it."""
        return FIFO_SIZE if self.fifo_enabled else 1

    @property
    def trigger(self) -> int:
        return RX_TRIGGER[self.fcr >> 6] if self.fifo_enabled else 1

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    @property
    def baud(self) -> float | None:
        return BASE_BAUD / self.divisor if self.divisor else None

    def msr_inputs(self) -> int:
        """CTS, DSR, RI, DCD; in loopback wired from RTS, DTR, OUT1, OUT2 (datasheet: MCR bit 4)."""
        if not self.loopback:
            return self.modem_inputs
        m = self.mcr
        return (
            (MSR_CTS if m & MCR_RTS else 0)
            | (MSR_DSR if m & MCR_DTR else 0)
            | (MSR_RI if m & MCR_OUT1 else 0)
            | (MSR_DCD if m & MCR_OUT2 else 0)
        )

    def pending_source(self) -> int | None:
        """The highest-priority pending interrupt (the IIR identification), or None."""
        ier = self.ier
        if ier & IER_ELSI and self.overrun:
            return IIR_LINE_STATUS
        if ier & IER_ERBFI and len(self.rx) >= self.trigger:
            return IIR_RX_DATA
        if ier & IER_ERBFI and self.fifo_enabled and self.rx:
            return IIR_RX_TIMEOUT  # below the trigger level and nothing arriving: the timer ran out
        if ier & IER_ETBEI and self.thr_ipending:
            return IIR_THRE
        if ier & IER_EDSSI and self.msr_delta:
            return IIR_MODEM
        return None

    def lsr(self) -> int:
        empty = not self.tx
        return (
            (LSR_DR if self.rx else 0)
            | (LSR_OE if self.overrun else 0)
            | (LSR_THRE if empty else 0)
            | (LSR_TEMT if empty else 0)  # the shift register sends whole characters at once
        )

    # --- the guest's accesses (IoDevice) ------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        """Port read at ``addr`` (0-7); a wider access reads consecutive registers, as the ISA bus splits it."""
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_reg(addr + i) << (8 * i)
            self._update_irq()
            if self.state is not None:
                self._save()
            return value

    def write(self, addr: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_reg(addr + i, (value >> (8 * i)) & 0xFF)
            self._update_irq()
            if self.state is not None:
                self._save()

    # --- the restart state --------------------------------------------------------------------

    def _save(self) -> None:
        assert self.state is not None
        rx, tx = self.rx, self.tx
        self.state.store(
            STATE_LAYOUT,
            STATE_VERSION,
            self.ier,
            self.lcr,
            self.mcr,
            self.scr,
            self.fcr,
            self.divisor,
            self.overrun,
            self.thr_ipending,
            self.modem_inputs,
            self.msr_delta,
            self.irq_level,
            len(rx),
            bytes(rx),
            len(tx),
            bytes(tx),
        )

    def restore(self) -> bool:
        """Take every register, both FIFOs and the IRQ line's level from ``state``, as a device
        model that died left them; False (nothing changed) when it holds none of this layout."""
        data = self.state.load() if self.state is not None else None
        if data is None or len(data) < STATE_LAYOUT.size or data[0] != STATE_VERSION:
            return False
        (_, ier, lcr, mcr, scr, fcr, divisor, overrun, thr, modem, delta, irq, nrx, rx, ntx, tx) = (
            STATE_LAYOUT.unpack_from(data)
        )
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.divisor = ier, lcr, mcr, scr, fcr, divisor
            self.overrun, self.thr_ipending, self.irq_level = bool(overrun), bool(thr), bool(irq)
            self.modem_inputs, self.msr_delta = modem, delta
            self.rx = deque(rx[: min(nrx, FIFO_SIZE)])
            self.tx = deque(tx[: min(ntx, FIFO_SIZE)])
        return True

    def resync_irq(self) -> None:
        """Drive the IRQ line to what the registers say, whatever Xen last heard (a device model
        killed between ``set_isa_irq_level`` and its store left the two apart; the DMOP is
        idempotent in Xen, ``hvm_isa_irq_assert``/``_deassert`` count each line once)."""
        with self._lock:
            self.irq_level = level = self.line_level()
            if self.set_irq is not None:
                source = self.pending_source()
                self.set_irq(level, SOURCE_NAMES[source] if level and source is not None else "")
            if self.state is not None:
                self._save()

    def _read_reg(self, reg: int) -> int:
        self._transmit()
        dlab = self.lcr & LCR_DLAB
        if reg == RBR:
            return self.divisor & 0xFF if dlab else self._pop_rx()
        if reg == IER:
            return self.divisor >> 8 if dlab else self.ier
        if reg == IIR:
            source = self.pending_source()
            if source == IIR_THRE:
                self.thr_ipending = False  # reading IIR with THRE as the source clears it
            return (IIR_FIFOS if self.fifo_enabled else 0) | (IIR_NO_INT if source is None else source)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr()
            self.overrun = False  # OE (and the line status interrupt) clear on read
            return value
        if reg == MSR:
            value = self.msr_inputs() | self.msr_delta
            self.msr_delta = 0
            return value
        if reg == SCR:
            return self.scr
        raise ValueError(f"uart16550: register offset {reg} is not 0..7")

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == THR and not dlab:
            self._write_thr(value)
            return
        self._transmit()
        if reg == DLL and dlab:
            self.divisor = (self.divisor & 0xFF00) | value
        elif reg == DLM and dlab:
            self.divisor = (self.divisor & 0x00FF) | (value << 8)
        elif reg == IER:
            if value & IER_ETBEI and not self.ier & IER_ETBEI and not self.tx:
                self.thr_ipending = True  # enabling ETBEI with THR empty interrupts at once
            self.ier = value & 0x0F
        elif reg == FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            before = self.msr_inputs()
            self.mcr = value & 0x1F
            self._modem_changed(before)
        elif reg == SCR:
            self.scr = value
        elif reg in (LSR, MSR):
            pass  # read-only status (LSR writes are a factory test mode)
        else:
            raise ValueError(f"uart16550: register offset {reg} is not 0..7")

    def _write_thr(self, value: int) -> None:
        if len(self.tx) >= self.capacity:
            self._send(bytes((self.tx[0],)))  # full: the shift register takes the oldest
            self.tx.popleft()  # once it is out: a kill before this store sends it again, never loses it
        self.tx.append(value)
        self.thr_ipending = False  # a THR write clears the THRE interrupt
        # The line is infinitely fast, as QEMU's: the byte goes out now and THRE is back before
        # the access ends, so the IRQ line, updated at the end of each access, stays up through
        # a burst of THR writes instead of pulsing down and up for every byte (two
        # set_isa_irq_level DMOPs and a spurious interrupt each); the driver's IIR read in its
        # handler lowers it, and its next THR write raises it again.
        self._transmit()

    def _write_fcr(self, value: int) -> None:
        if not value & FCR_ENABLE:
            if self.fifo_enabled:
                self.rx.clear()
                self._clear_tx()
            self.fcr = 0  # the other bits are only programmed together with FCR0
            return
        if not self.fifo_enabled:
            self.rx.clear()  # changing FCR0 resets both FIFOs
            self._clear_tx()
        if value & FCR_CLEAR_RX:
            self.rx.clear()
        if value & FCR_CLEAR_TX:
            self._clear_tx()
        self.fcr = value & 0xC9  # enable, DMA mode, trigger (bits 1-2 clear themselves)
        self._fill()

    def _clear_tx(self) -> None:
        if self.tx:
            self.tx.clear()
            self.thr_ipending = True  # THR became empty

    def _pop_rx(self) -> int:
        if not self.rx:
            return 0
        value = self.rx.popleft()
        self._fill()  # the next typed character arrives
        return value

    # --- the line -------------------------------------------------------------------------------

    def transmit(self) -> None:
        """Send what the transmitter holds: after a restart, what the predecessor left in the FIFO."""
        with self._lock:
            self._transmit()
            self._update_irq()
            if self.state is not None:
                self._save()

    def _transmit(self) -> None:
        if not self.tx:
            return
        if self.state is not None:
            # One byte at a time, each removed from the FIFO (and THR reported empty with the
            # last) by a store made after the byte is out: a device model killed in between
            # sends that one byte again after its restart; none is lost, at most one repeated.
            tx = self.tx
            while tx:
                self._send(bytes((tx[0],)))
                tx.popleft()
                if not tx:
                    self.thr_ipending = True
                self._save()
            return
        data = bytes(self.tx)
        self.tx.clear()
        self.thr_ipending = True  # THR (and TSR) now empty
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.loopback:
            for b in data:
                self._arrive(b)  # TX wired to RX; nothing leaves the chip
        else:
            self.output(data)

    def _arrive(self, byte: int) -> None:
        if len(self.rx) < self.capacity:
            self.rx.append(byte)
        else:
            # FIFO full: the new character is lost (without FIFOs it replaces the unread one).
            if not self.fifo_enabled:
                self.rx[-1] = byte
            self.overrun = True

    def receive(self, data: bytes) -> None:
        """Characters arrive on the line now, however full the receiver is (overrun sets LSR.OE)."""
        with self._lock:
            for b in data:
                self._arrive(b)
            self._update_irq()
            if self.state is not None:
                self._save()

    def queue_input(self, data: bytes) -> None:
        """Characters arrive as fast as the guest takes them (a terminal at typing speed): never an overrun."""
        with self._lock:
            self.pending_input.extend(data)
            self._fill()
            self._update_irq()
            if self.state is not None:
                self._save()

    def _fill(self) -> None:
        while self.pending_input and len(self.rx) < self.capacity:
            self.rx.append(self.pending_input.popleft())

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        """The far end's modem lines (ignored by MSR while in loopback)."""
        with self._lock:
            before = self.msr_inputs()
            self.modem_inputs = (
                (MSR_CTS if cts else 0) | (MSR_DSR if dsr else 0) | (MSR_RI if ri else 0) | (MSR_DCD if dcd else 0)
            )
            self._modem_changed(before)
            self._update_irq()
            if self.state is not None:
                self._save()

    def _modem_changed(self, before: int) -> None:
        after = self.msr_inputs()
        changed = before ^ after
        if changed & MSR_CTS:
            self.msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_delta |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:
            self.msr_delta |= MSR_TERI  # trailing edge only
        if changed & MSR_DCD:
            self.msr_delta |= MSR_DDCD

    # --- the IRQ line ---------------------------------------------------------------------------

    def line_level(self) -> bool:
        """The PC's IRQ line: an interrupt pending and OUT2 driving the gate.  In loopback
        the OUT2 pin is forced inactive (the datasheet's MCR bit 4), so nothing reaches it."""
        return self.pending_source() is not None and bool(self.mcr & MCR_OUT2) and not self.loopback

    def _update_irq(self) -> None:
        level = self.line_level()
        if level != self.irq_level:
            self.irq_level = level
            if self.set_irq is not None:
                source = self.pending_source()
                self.set_irq(level, SOURCE_NAMES[source] if level and source is not None else "")

    def release_irq(self) -> None:
        """Lower the line if it is up (on exit, so the guest is not left with IRQ 4 asserted)."""
        with self._lock:
            if self.irq_level:
                self.irq_level = False
                if self.set_irq is not None:
                    self.set_irq(False, "")
                if self.state is not None:
                    self._save()


# --- wiring a UART to Xen and to the host's terminal ---------------------------------------------


def isa_irq_setter(
    dm: DeviceModel, domid: int, report: Callable[[bool, str], None] | None = None
) -> Callable[[bool, str], None]:
    """``set_irq`` for a UART: XEN_DMOP_set_isa_irq_level on IRQ 4 (the UART calls it on edges only)."""

    def set_irq(level: bool, source: str) -> None:
        dm.set_isa_irq_level(domid, IRQ, int(level))
        if report is not None:
            report(level, source)

    return set_irq


def attach(loop: ServeLoop, uart: Uart16550, input_fd: int | None) -> Callable[[], None]:
    """Watch ``input_fd`` (the keyboard) from ``loop``'s thread.  Returns the function that
    closes what this opened."""
    quiet_ends: list[int] = []
    if input_fd is not None and not _pollable(input_fd):
        # A regular file or /dev/null (epoll refuses them): everything it holds is typed at once.
        uart.queue_input(_read_all(input_fd))
    elif input_fd is not None:
        fd = input_fd

        def on_input() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError as e:  # a pty whose other side is gone, a closed terminal
                log.warning("input: %s; no more input", e)
                data = b""
            if data:
                uart.queue_input(data)
                return
            # End of input: point the fd at an empty pipe.  Closing the old open file this way
            # also drops it from the loop's epoll set (its only reference is ``fd``: see
            # _main_domain), and a stray wake-up reads nothing rather than blocking.
            quiet_r, quiet_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.dup2(quiet_r, fd)
            os.close(quiet_r)
            quiet_ends.append(quiet_w)  # held open: the pipe never reads end-of-file

        loop.add_reader(fd, on_input)

    def close() -> None:
        for end in quiet_ends:
            os.close(end)

    return close


def _pollable(fd: int) -> bool:
    probe = select.epoll()
    try:
        probe.register(fd, select.EPOLLIN)
    except PermissionError:
        return False
    finally:
        probe.close()
    return True


def _read_all(fd: int, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = os.read(fd, min(65536, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class MockConsole:
    """What the demo shows: the guest's console text and IRQ 4's edges, one per line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.text = bytearray()
        self.irq: list[tuple[bool, str]] = []
        self._column = 0
        try:
            "↑↓".encode(getattr(out, "encoding", None) or "utf-8")
            self._arrows = ("↑", "↓")
        except (UnicodeEncodeError, LookupError):
            self._arrows = ("up", "down")

    def console(self, data: bytes) -> None:
        self.text += data
        shown = data.replace(b"\r", b"").decode("latin-1")  # as a terminal shows \r\n
        if shown:
            self.out.write(shown)
            self._column = len(shown) - shown.rfind("\n") - 1 if "\n" in shown else self._column + len(shown)
            self.out.flush()

    def irq_edge(self, level: bool, source: str) -> None:
        self.irq.append((level, source))
        self.note(f"[irq{IRQ} {self._arrows[0 if level else 1]}{' ' + source if source else ''}]")

    def note(self, line: str) -> None:
        """A host-side line, kept apart from the guest's text."""
        self.out.write(("\n" if self._column else "") + line + "\n")
        self._column = 0
        self.out.flush()


# --- the simulated guest's firmware (mock only) -----------------------------------------------------


class FirmwareError(RuntimeError):
    """The simulated firmware found the UART misbehaving."""


class Firmware:
    """A guest driver for the 16550A at ``base``, running on ``guest``'s vCPU 0.

    ``irq_asserted()`` tells whether the guest's IRQ 4 line is up; waiting for it is
    the firmware's ``hlt``.  The steps are those of Linux's 8250 driver (autoconfig,
    startup) and of a BIOS console.
    """

    def __init__(self, guest: Any, irq_asserted: Callable[[], bool], *, base: int = COM1, timeout: float = 5.0):
        self.guest = guest
        self.irq_asserted = irq_asserted
        self.base = base
        self.timeout = timeout

    def inb(self, reg: int) -> int:
        return int(self.guest.inb(self.base + reg))

    def outb(self, reg: int, value: int) -> None:
        self.guest.outb(self.base + reg, value)

    def wait_irq(self, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.irq_asserted():
            if time.monotonic() > deadline:
                raise FirmwareError(f"no IRQ {IRQ} in {self.timeout}s while waiting for {what}")
            time.sleep(0.001)

    def probe(self) -> None:
        """Is a 16550A there?  Scratch register, loopback wiring, FIFO bits in IIR."""
        for pattern in (0xA5, 0x5A):
            self.outb(SCR, pattern)
            if self.inb(SCR) != pattern:
                raise FirmwareError(f"scratch register does not hold {pattern:#x}")
        self.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)  # Linux's autoconfig loopback test
        if self.inb(MSR) & 0xF0 != MSR_DCD | MSR_CTS:
            raise FirmwareError("loopback does not wire OUT2→DCD and RTS→CTS")
        self.outb(MCR, 0)
        self.outb(FCR, FCR_ENABLE)
        if self.inb(IIR) & IIR_FIFOS != IIR_FIFOS:
            raise FirmwareError("no working FIFOs: not a 16550A")

    def init(self, baud: int = BASE_BAUD) -> None:
        """115200 8N1, FIFOs on (RX trigger 8), OUT2 on, and the THRE interrupt checked."""
        self.outb(IER, 0)
        divisor = BASE_BAUD // baud
        self.outb(LCR, LCR_DLAB)
        self.outb(DLL, divisor & 0xFF)
        self.outb(DLM, divisor >> 8)
        self.outb(LCR, 0x03)  # 8 data bits, no parity, 1 stop bit; DLAB off
        self.outb(FCR, 0x80 | FCR_CLEAR_TX | FCR_CLEAR_RX | FCR_ENABLE)
        self.outb(MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
        # As serial8250_do_startup: enabling the THRE interrupt with THR empty must interrupt.
        self.outb(IER, IER_ETBEI)
        self.wait_irq("THRE")
        if self.inb(IIR) & 0x0F != IIR_THRE:
            raise FirmwareError("IIR does not report THRE")
        self.outb(IER, 0)

    def puts(self, text: bytes) -> None:
        """Polled output: wait for THRE, fill the FIFO; at the end wait until all is sent."""
        for i in range(0, len(text), FIFO_SIZE):
            self._wait_lsr(LSR_THRE)
            for b in text[i : i + FIFO_SIZE]:
                self.outb(THR, b)
        self._wait_lsr(LSR_TEMT)

    def _wait_lsr(self, bit: int) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.inb(LSR) & bit:
            if time.monotonic() > deadline:
                raise FirmwareError(f"LSR bit {bit:#x} never set")

    def readline(self, limit: int = 256) -> bytes:
        """Interrupt-driven input of one line (up to CR or LF)."""
        line = bytearray()
        self.outb(IER, IER_ERBFI | IER_ELSI)
        try:
            while len(line) < limit:
                self.wait_irq("input")
                iir = self.inb(IIR) & 0x0F
                if iir == IIR_LINE_STATUS:
                    self.inb(LSR)  # an overrun: characters were lost; carry on
                elif iir in (IIR_RX_DATA, IIR_RX_TIMEOUT):
                    while self.inb(LSR) & LSR_DR:
                        c = self.inb(RBR)
                        if c in b"\r\n":
                            return bytes(line)
                        line.append(c)
            return bytes(line)
        finally:
            self.outb(IER, 0)


# --- the demo on the mock -------------------------------------------------------------------------

BANNER = b"Hello from the guest's 16550A at 0x3f8 (115200 8N1, FIFOs on)!\r\n"
PROMPT = b"Type a line for the guest to read:\r\n"
DEFAULT_LINE = b"hello from the host"


@dataclasses.dataclass
class MockRun:
    console: bytes  # everything the guest wrote to the UART
    line: bytes  # what the guest read back (b"" if a signal came first)
    irq: list[tuple[bool, str]]  # IRQ 4's edges
    servers_left: int
    domid: int
    signal: int | None = None  # the signal that ended the run early


def run_on_mock(
    line: bytes | Callable[[], bytes], out: TextIO, *, xen: MockXen | None = None, domid: int | None = None
) -> MockRun:
    """Serve a simulated guest firmware on the mock Xen (``xen``/``domid``, default new ones);
    the host types ``line`` (or what calling it returns, once the guest asks) when the guest
    asks for input.  The loop serves in this thread, the firmware runs in another; SIGINT or
    SIGTERM ends the run early (``MockRun.signal``).  Raises ``NotHvmError`` for a PV domain."""
    from xendmop.mock.simguest import SimGuest

    view = MockConsole(out)
    with dm_program.open_mock(xen, domid) as mock:
        mock.require_hvm()  # ISA IRQ level changes for an HVM guest only
        host, domid = mock.mock_xen, mock.domid
        uart = Uart16550(view.console, isa_irq_setter(mock.dm, domid, view.irq_edge))
        server = mock.ioreq_server()
        server.add_port_range(COM1, COM1 + 7, uart, "uart16550")
        keyboard_r, keyboard_w = os.pipe()  # the host's terminal, as on real Xen
        loop = ServeLoop(server)
        close_input = attach(loop, uart, keyboard_r)

        def firmware() -> bytes:
            fw = Firmware(SimGuest(host, domid, timeout=5), lambda: host.domain(domid).gsi_level(IRQ))
            fw.probe()
            fw.init()
            fw.puts(BANNER + PROMPT)
            typed = (line() if callable(line) else line).rstrip(b"\r\n") + b"\r"
            view.note(f"[host types {typed.decode('latin-1')!r}]")
            os.write(keyboard_w, typed)
            got = fw.readline()
            fw.puts(b"The guest read: " + got + b"\r\n")
            return got

        try:
            # After a signal the firmware may wait on the host's keyboard forever: no grace.
            run = dm_program.run_guest_while_serving(loop, firmware, signal_grace=0)
        finally:
            uart.release_irq()
            close_input()
            os.close(keyboard_r)
            os.close(keyboard_w)
        return MockRun(bytes(view.text), run.result or b"", view.irq, len(mock.servers_left()), domid, run.signal)


# --- a real dom0 ------------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on terminal ``fd`` (every key goes to the guest) but with signals kept,
    so Ctrl-C still stops the device model; restored on the way out."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] |= termios.ISIG
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """Output to ``fd``; on a non-blocking fd (a pty nobody reads) what does not fit is dropped."""

    def write(data: bytes) -> None:
        while data:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                return
            data = data[n:]

    return write


def serve_domain(
    connection: dm_program.Connection,
    *,
    input_fd: int | None,
    output_fd: int,
    on_ready: Callable[[], None] | None = None,
    state_dir: str | None = None,
    say: Callable[[str], None] | None = None,
) -> int | None:
    """Serve COM1 of the connection's domain in this (main) thread until SIGINT/SIGTERM; the
    server is destroyed and IRQ 4 lowered on the way out.  Returns the signal.

    ``state_dir``: keep a restart state there (``xendmop.runtime.restart``): if it names an
    ioreq server Xen still has, take it over with the UART's registers as they were left
    (a device model killed with SIGKILL); otherwise start afresh, ``say``-ing why in one line
    if a record was there.  A clean stop destroys the server and removes the state."""
    from xendmop.runtime.restart import RestartState

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    domid = connection.domid
    with contextlib.ExitStack() as stack:
        restart = None
        if state_dir is not None:
            restart = stack.enter_context(RestartState(state_dir, domid, "uart16550", device_size=STATE_LAYOUT.size))
        uart = Uart16550(
            fd_writer(output_fd),
            isa_irq_setter(connection.dm, domid),
            state=restart.device if restart is not None else None,
        )
        if restart is None:
            server = connection.ioreq_server()
        else:
            server = restart.ioreq_server(connection.dm, opener=connection.opener, deprivilege=connection.drop)
            if restart.stale:
                say(f"uart16550: dom{domid}: {restart.stale}")
            if server.takeover is not None:
                restored = uart.restore()
                say(
                    f"uart16550: dom{domid}: taking over ioreq server {server.takeover} "
                    f"({'registers restored' if restored else 'no registers kept'}) from {restart.path}"
                )
                uart.resync_irq()
        server.add_port_range(COM1, COM1 + 7, uart, "uart16550")
        loop = ServeLoop(server)
        close_input = attach(loop, uart, input_fd)
        started = False

        def ready() -> None:
            nonlocal started
            started = True
            uart.transmit()  # what a predecessor left in the FIFO goes out, and THRE follows
            if on_ready is not None:
                on_ready()

        try:
            return dm_program.serve_until_signal(loop, on_ready=ready)  # up (and deprivileged) before on_ready
        finally:
            with dm_program.unless_gone():  # a domain gone has no IRQ to lower
                uart.release_irq()
            close_input()
            if restart is not None and (started or server.takeover is None):
                restart.clear()  # the server is destroyed (or was never ours): nothing to take over
    return None  # not reached: the with block returns or raises


def read_line(fd: int) -> bytes:
    """One line from ``fd``, a byte at a time: no buffered file (whose lock a thread blocked
    in it would hold at exit) and nothing read past the line."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        data += byte
    return bytes(data)


def _mock_line(args: argparse.Namespace) -> bytes | Callable[[], bytes]:
    if args.line == "-" or (args.line is None and sys.stdin.isatty()):
        return lambda: read_line(sys.stdin.fileno())  # asked for only once the guest prompts
    return DEFAULT_LINE if args.line is None else os.fsencode(args.line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=dm_program.EXIT_STATUS_HELP)
    dm_program.add_arguments(p, assume_hvm=True)
    p.add_argument("--line", help="on the mock: what the host types to the guest ('-': read it from stdin)")
    p.add_argument("--pty", action="store_true", help="on a real dom0: a new pty instead of this terminal")
    p.add_argument(
        "--state-dir",
        nargs="?",
        const=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=(
            "with --domid: keep the ioreq server's id and the UART's registers in DIR "
            f"(default {DEFAULT_STATE_DIR}); started again after a crash (SIGKILL), take that "
            "server over and carry on where the guest was; a clean stop removes them"
        ),
    )
    args, target = dm_program.parse(p, argv)
    if target.where is dm_program.Where.MOCK:
        if args.pty:
            p.error("--pty is for a real dom0 (--domid N); on the mock the host types --line")
        if args.state_dir:
            p.error("--state-dir is for --domid N: the in-process mock's servers end with this process")
        return _main_mock(args)
    # ISA IRQ 4 goes out: a domain that is not HVM is refused (exit 2) before anything is opened.
    return dm_program.run_target(
        target, lambda connection: _main_domain(args, connection), name="uart16550", parser=p, hvm_only=True
    )


def _main_mock(args: argparse.Namespace) -> int:
    run = run_on_mock(_mock_line(args), sys.stdout)
    stopped = "stopped; " if run.signal is not None else ""
    if run.servers_left:
        print(f"uart16550: {stopped}{run.servers_left} ioreq server(s) left in dom{run.domid}", file=sys.stderr)
        return 1
    if stopped:  # a signal is how a device model is asked to stop: a success once the server is gone
        print(f"uart16550: {stopped}the ioreq server was destroyed, none is left in dom{run.domid}", file=sys.stderr)
    return 0


def _main_domain(args: argparse.Namespace, connection: dm_program.Connection) -> int:
    """Serve the connection's domain (a real dom0's, or a mock host process's) on a terminal or pty."""
    domid = connection.domid
    with contextlib.ExitStack() as stack:
        if args.pty:
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            stack.callback(os.close, master)
            stack.callback(os.close, slave)  # held open: the master reads EIO while no slave is open
            in_fd, out_fd = master, master
            print(f"uart16550: dom{domid}'s COM1 is on {os.ttyname(slave)}", file=sys.stderr)
        elif os.isatty(sys.stdin.fileno()):
            # The terminal opened anew: an open file of our own, not shared with stdout.
            term = os.open(os.ttyname(sys.stdin.fileno()), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            stack.callback(os.close, term)
            stack.enter_context(raw_terminal(term))
            in_fd, out_fd = term, term
        else:
            in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()

        def ready() -> None:
            dropped = f"; deprivileged to uid {args.depriv[0]} gid {args.depriv[1]}" if connection.drop else ""
            print(f"uart16550: serving dom{domid}'s COM1{dropped}; Ctrl-C to stop", file=sys.stderr, flush=True)

        signum = serve_domain(connection, input_fd=in_fd, output_fd=out_fd, on_ready=ready, state_dir=args.state_dir)
    print("\r\n" + dm_program.stopped_line("uart16550", signum), file=sys.stderr)  # \r: the terminal may have been raw
    return 0


if __name__ == "__main__":
    sys.exit(main())
