"""A simulated HVM guest on the mock Xen: vCPUs that issue IO the way Xen does for them.

Each access is routed as ``ioreq_server_select`` (``xen/common/ioreq.c``) does —
enabled servers only, a port/MMIO access goes to a server only if it lies entirely
inside one registered range, PCI config by SBDF, servers tried from the highest id
down (``FOR_EACH_IOREQ_SERVER``; with ids never reused that is "most recently
created wins") — and no server means reads return all-ones (Xen's null handler).
Then, as ``ioreq_send``: the vCPU's slot must be ``STATE_IOREQ_NONE``, the ioreq is
written into the real shared page, the state set to READY, the server's port
raised; and as ``wait_for_io``: wait for IORESP_READY, take ``data``, set NONE.  A
state that goes backwards or is unknown is what makes Xen crash the guest: here it
raises ``GuestCrash``.  No answer in ``timeout`` seconds raises ``GuestTimeout``
naming the vCPU and the pending ioreq — never a hang.

Built only on the mock's documented internal API (``xendmop.mock`` docstring).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

from ..abi.ioreq import (
    IOREQ_BUFFER_SLOT_NUM,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
)
from ..abi.ioreq_slot import IOREQ_SIZE, IOREQ_SLOT, STATE_BYTE, Ioreq, all_ones
from ..errors import ArgumentError
from ..types import BufIoreq, IoRangeType

__all__ = ["GuestCrash", "GuestTimeout", "SimGuest"]

#: ``vp_eport`` and the state byte of a slot, read in one step from its offset 24
_EPORT_STATE = struct.Struct("<I2xB")
#: ``data`` of a slot, at its offset 8
_DATA = struct.Struct("<Q")
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_PORT_RANGE = int(IoRangeType.PORT)
#: the longest single wait for the DM's notify: a destroyed server is noticed this often
_WAIT_SLICE = 0.05
_MMIO_SIZES = (1, 2, 4, 8)
_PCI_SIZES = (1, 2, 4)
# pytest leaves this module's frames out of a failing test's traceback: a GuestTimeout then
# shows the test's line and the message, not the simulated guest's source.
__tracebackhide__ = True


def _check_size(op: str, size: int, allowed: tuple[int, ...]) -> None:
    """Refuse an access size no guest instruction has (a 3-byte load would otherwise float to all-ones)."""
    if size not in allowed or isinstance(size, bool):
        raise ArgumentError(op, "size", size, f"must be {', '.join(map(str, allowed[:-1]))} or {allowed[-1]} bytes")


def _route(type: int, addr: int, size: int, count: int) -> tuple[int, int, int] | None:
    """What ``ioreq_server_select`` (xen/common/ioreq.c) looks up for an access: the range
    type and the span that one range must hold whole; None for a type no range can claim."""
    if type == IOREQ_TYPE_PIO:
        return IoRangeType.PORT, addr, addr + size - 1
    if type == IOREQ_TYPE_COPY:
        # Xen checks [addr, addr + size * count - 1], whatever df says.
        return IoRangeType.MEMORY, addr, addr + size * count - 1
    if type == IOREQ_TYPE_PCI_CONFIG:
        sbdf = addr >> 32  # the SBDF is in the address's upper half, the register below
        return IoRangeType.PCI, sbdf, sbdf
    return None


class GuestTimeout(TimeoutError):
    """A vCPU's ioreq was not answered in time."""

    def __init__(self, domid: int, vcpu: int, req: Ioreq, timeout: float, state: int) -> None:
        super().__init__(f"dom{domid} vCPU{vcpu}: no answer in {timeout}s to [{req}] (slot state {state})")
        self.vcpu, self.req = vcpu, req


class GuestCrash(RuntimeError):
    """What Xen's ``domain_crash`` would do: the device model broke the protocol."""


class SimGuest:
    """``SimGuest(xen, domid)``: IO issued by the guest's vCPUs (thread-safe per vCPU)."""

    def __init__(self, xen: Any, domid: int, *, timeout: float = 5.0) -> None:
        self.xen = xen
        self.domid = domid
        self.timeout = timeout
        self._vcpu_locks: dict[int, threading.Lock] = {}

    # --- routing (ioreq_server_select) ---------------------------------------------------

    def _domain(self) -> Any:
        return self.xen.hypervisor.domains[self.domid]

    def select(self, req: Ioreq) -> Any | None:
        """The server Xen would pick for ``req``, or None."""
        route = _route(req.type, req.addr, req.size, req.count)
        if route is None:
            return None
        with self.xen.lock:
            return self._domain().select_ioreq_server(*route)

    # --- one synchronous access (ioreq_send + wait_for_io) -------------------------------------

    def send(self, req: Ioreq, vcpu: int = 0, *, timeout: float | None = None) -> int:
        """Issue ``req`` on ``vcpu`` and return the final ``data`` (all-ones for an unclaimed read)."""
        return self._access(
            req.type, req.addr, req.data, req.count, req.size, req.data_is_ptr, req.dir, req.df, vcpu, timeout, req
        )

    def _access(
        self,
        type: int,
        addr: int,
        data: int,
        count: int,
        size: int,
        data_is_ptr: bool,
        dir: int,
        df: bool,
        vcpu: int = 0,
        timeout: float | None = None,
        req: Ioreq | None = None,
    ) -> int:
        """One access, its fields as plain values: no ``Ioreq`` is built unless one must be
        reported (``req``, when the caller has one, is the one a ``GuestTimeout`` names)."""
        lock = self._vcpu_locks.get(vcpu)
        if lock is None:
            lock = self._vcpu_locks.setdefault(vcpu, threading.Lock())
        off = vcpu * IOREQ_SIZE
        # _route's answer for a port access, without the call
        route = (_PORT_RANGE, addr, addr + size - 1) if type == IOREQ_TYPE_PIO else _route(type, addr, size, count)
        xen = self.xen
        with lock:
            # One host-lock section routes, posts and raises the port (ioreq_send): the
            # server cannot change between the choice and the post.
            with xen.lock:
                domain = xen.hypervisor.domains[self.domid]
                server = None if route is None else domain.select_ioreq_server(*route)
                if server is None:
                    return all_ones(size) if dir == IOREQ_READ and not data_is_ptr else data
                page = server.page
                eport, state = _EPORT_STATE.unpack_from(page, off + 24)
                state &= 0xF
                if state != STATE_IOREQ_NONE or eport != server.vcpu_ports[vcpu]:
                    raise GuestCrash(f"dom{self.domid} vCPU{vcpu}: device model set bad IO state {state}/port {eport}")
                flags = (dir & 1) << 5  # state NONE until the body is written; data_is_ptr, df:
                if data_is_ptr:
                    flags |= 0x10
                if df:
                    flags |= 0x40
                IOREQ_SLOT.pack_into(
                    page, off, addr & _U64, data & _U64, count & _U32, size & _U32, eport, flags, type & 0xFF
                )
                page[off + STATE_BYTE] = flags | STATE_IOREQ_READY  # after the body
                server.notify_fd(vcpu)  # made before the DM can notify
                # A device model in another process rings a doorbell this thread watches (before
                # the port is raised: it may notify at once); None: its NOTIFY comes as it did.
                doorbell = xen.dm_doorbell_locked(domain, eport, True)
                xen.evtchn_notify_from_xen_locked(domain, eport)
            # wait_for_io: sleep until the DM's notify, then look at the slot once.
            if timeout is None:
                timeout = self.timeout
            deadline = time.monotonic() + timeout
            prev = state = STATE_IOREQ_READY
            wait = server.wait_dm_notify
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if req is None:
                            req = Ioreq(addr, data, count, size, 0, 0, data_is_ptr, dir, df, type)
                        raise GuestTimeout(self.domid, vcpu, req, timeout, state)
                    # Short waits only so that a destroyed server is noticed.
                    woken = wait(vcpu, remaining if remaining < _WAIT_SLICE else _WAIT_SLICE, doorbell)
                    with xen.lock:
                        # Like wait_on_xen_event_channel, the state is looked at only when the DM's
                        # notify wakes us: an answer without a notify is lost.  An answer notified
                        # before the server went away is still taken: the notify made the vCPU
                        # runnable before the destroy paused the domain.
                        state = page[off + STATE_BYTE] & 0xF if woken else prev
                        if state < prev or state > STATE_IORESP_READY:
                            raise GuestCrash(
                                f"dom{self.domid} vCPU{vcpu}: weird ioreq state transition {prev} -> {state}"
                            )
                        prev = state
                        if state == STATE_IORESP_READY:
                            page[off + STATE_BYTE] = (page[off + STATE_BYTE] & 0xF0) | STATE_IOREQ_NONE
                            if doorbell is not None:
                                xen.dm_doorbell_locked(domain, eport, False)
                                doorbell = None
                            return int(_DATA.unpack_from(page, off + 8)[0])
                        if self._domain().server(server.id) is not server:
                            # The emulator died under us: wait_for_io sees STATE_IOREQ_NONE and
                            # completes the access with ~0 ("emulator is dying" in xen/common/ioreq.c).
                            return all_ones(size) if dir == IOREQ_READ else data
            finally:
                if doorbell is not None:  # no longer waiting: the NOTIFY goes by message again
                    with xen.lock:
                        xen.dm_doorbell_locked(domain, eport, False)

    # --- buffered writes (ioreq_send_buffered) --------------------------------------------------

    def send_buffered(self, type: int, addr: int, size: int, data: int) -> bool:
        """Queue a write in the buffered ring of the server that claims it; False if the
        ring is full or nobody can take it (Xen would then use the synchronous path).

        One host-lock section chooses the server, fills its ring and raises its port: a server
        destroyed meanwhile is either not chosen or fully written to, as in Xen, where
        ``ioreq_server_destroy`` (xen/common/ioreq.c) pauses the domain, so no vCPU is inside
        ``ioreq_send_buffered`` while its server goes."""
        route = _route(type, addr, size, 1)
        if route is None or addr > 0xFFFFF or size not in (1, 2, 4, 8):
            return False
        with self.xen.lock:
            domain = self._domain()
            server = domain.select_ioreq_server(*route)
            pg = None if server is None else server.bufpage
            if server is None or pg is None:
                return False
            ptrs = pg[:8].cast("I")
            rd, wr = ptrs[0], ptrs[1]
            need = 2 if size == 8 else 1
            if (wr - rd) & 0xFFFFFFFF > IOREQ_BUFFER_SLOT_NUM - need:
                return False
            log2 = {1: 0, 2: 1, 4: 2, 8: 3}[size]
            word = (type & 0xFF) | (log2 << 10) | ((addr & 0xFFFFF) << 12)
            slots = pg[8 : 8 + 8 * IOREQ_BUFFER_SLOT_NUM].cast("I")
            for i in range(need):
                k = 2 * ((wr + i) % IOREQ_BUFFER_SLOT_NUM)
                slots[k], slots[k + 1] = word, (data >> (32 * i)) & 0xFFFFFFFF
            ptrs[1] = (wr + need) & 0xFFFFFFFF  # after the slots (Xen: smp_wmb)
            if server.bufioreq_handling == BufIoreq.ATOMIC and ptrs[0] >= IOREQ_BUFFER_SLOT_NUM:
                # Xen canonicalises both pointers with one cmpxchg of the pair.
                n = ptrs[0] // IOREQ_BUFFER_SLOT_NUM
                ptrs[0], ptrs[1] = ptrs[0] - n * IOREQ_BUFFER_SLOT_NUM, ptrs[1] - n * IOREQ_BUFFER_SLOT_NUM
            self.xen.evtchn_notify_from_xen_locked(domain, server.bufioreq_port)
        return True

    # --- instructions ---------------------------------------------------------------------------

    def _pio(self, port: int, size: int, dir: int, value: int = 0, vcpu: int = 0) -> int:
        return self._access(IOREQ_TYPE_PIO, port, value, 1, size, False, dir, False, vcpu)

    # Every access below: vCPU ``vcpu`` issues it as a guest instruction would, through the
    # domain's ioreq server for that address (the shared page, the vCPU's event channel) and
    # waits for the answer; an access no server claims reads all-ones and writes go nowhere,
    # as on Xen.  ``GuestTimeout`` (naming the vCPU and the access) when no answer comes in
    # ``timeout`` seconds; ``ArgumentError`` for a size no instruction has.

    def outb(self, port: int, value: int, vcpu: int = 0) -> None:
        """``out`` of one byte ``value`` to I/O port ``port``."""
        self._access(IOREQ_TYPE_PIO, port, value, 1, 1, False, IOREQ_WRITE, False, vcpu)

    def outw(self, port: int, value: int, vcpu: int = 0) -> None:
        """``out`` of a 2-byte ``value`` to I/O port ``port``."""
        self._access(IOREQ_TYPE_PIO, port, value, 1, 2, False, IOREQ_WRITE, False, vcpu)

    def outl(self, port: int, value: int, vcpu: int = 0) -> None:
        """``out`` of a 4-byte ``value`` to I/O port ``port``."""
        self._access(IOREQ_TYPE_PIO, port, value, 1, 4, False, IOREQ_WRITE, False, vcpu)

    def inb(self, port: int, vcpu: int = 0) -> int:
        """``in`` of one byte from I/O port ``port``; returns it."""
        return self._access(IOREQ_TYPE_PIO, port, 0, 1, 1, False, IOREQ_READ, False, vcpu)

    def inw(self, port: int, vcpu: int = 0) -> int:
        """``in`` of 2 bytes from I/O port ``port``; returns them as an int."""
        return self._access(IOREQ_TYPE_PIO, port, 0, 1, 2, False, IOREQ_READ, False, vcpu)

    def inl(self, port: int, vcpu: int = 0) -> int:
        """``in`` of 4 bytes from I/O port ``port``; returns them as an int."""
        return self._access(IOREQ_TYPE_PIO, port, 0, 1, 4, False, IOREQ_READ, False, vcpu)

    def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        """A load of ``size`` bytes (1, 2, 4 or 8) from guest-physical ``addr``; returns it as an int."""
        _check_size("mmio_read", size, _MMIO_SIZES)
        return self._access(IOREQ_TYPE_COPY, addr, 0, 1, size, False, IOREQ_READ, False, vcpu)

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        """A store of ``value`` in ``size`` bytes (1, 2, 4 or 8) to guest-physical ``addr``."""
        _check_size("mmio_write", size, _MMIO_SIZES)
        self._access(IOREQ_TYPE_COPY, addr, value, 1, size, False, IOREQ_WRITE, False, vcpu)

    def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        """A read of ``size`` bytes (1, 2 or 4) of PCI function ``sbdf``'s config space at ``reg``,
        as Xen forwards the guest's 0xCF8/0xCFC access (``IOREQ_TYPE_PCI_CONFIG``)."""
        _check_size("pci_config_read", size, _PCI_SIZES)
        addr = (sbdf << 32) | reg
        return self._access(IOREQ_TYPE_PCI_CONFIG, addr, 0, 1, size, False, IOREQ_READ, False, vcpu)

    def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        """A write of ``value`` in ``size`` bytes (1, 2 or 4) to PCI function ``sbdf``'s config space at ``reg``."""
        _check_size("pci_config_write", size, _PCI_SIZES)
        addr = (sbdf << 32) | reg
        self._access(IOREQ_TYPE_PCI_CONFIG, addr, value, 1, size, False, IOREQ_WRITE, False, vcpu)

    def rep_outsb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        """``rep outsb``: ``count`` bytes from guest RAM at ``gpa`` (the last byte first when ``df``) to ``port``."""
        self._access(IOREQ_TYPE_PIO, port, gpa, count, 1, True, IOREQ_WRITE, df, vcpu)

    def rep_insb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        """``rep insb``: ``count`` bytes from ``port`` into guest RAM at ``gpa`` (downwards when ``df``)."""
        self._access(IOREQ_TYPE_PIO, port, gpa, count, 1, True, IOREQ_READ, df, vcpu)

    def rep_movs_to_mmio(self, addr: int, gpa: int, size: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        """``rep movs`` of ``count`` elements of ``size`` bytes (1, 2, 4 or 8) from guest RAM at
        ``gpa`` to MMIO at ``addr`` (one ioreq with ``data_is_ptr``, as Xen sends it)."""
        _check_size("rep_movs_to_mmio", size, _MMIO_SIZES)
        self._access(IOREQ_TYPE_COPY, addr, gpa, count, size, True, IOREQ_WRITE, df, vcpu)

    # --- RAM --------------------------------------------------------------------------------------

    def write_ram(self, gpa: int, data: bytes) -> None:
        """Store ``data`` in the guest's RAM at guest-physical ``gpa`` (no ioreq: RAM is the guest's own)."""
        self.xen.guest_write(self.domid, gpa, data)

    def read_ram(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of the guest's RAM from guest-physical ``gpa``."""
        return bytes(self.xen.guest_read(self.domid, gpa, n))
