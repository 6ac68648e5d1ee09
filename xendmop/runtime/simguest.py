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
from ..types import BufIoreq, IoRangeType
from .dispatch import IOREQ_SIZE, STATE_BYTE, Ioreq, all_ones

__all__ = ["GuestCrash", "GuestTimeout", "SimGuest"]


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
        with self.xen.lock:
            servers = self._domain().servers
            for sid in sorted(servers, reverse=True):
                s = servers[sid]
                if not s.enabled:
                    continue
                if req.type == IOREQ_TYPE_PCI_CONFIG:
                    if s.ranges[IoRangeType.PCI].contains(req.addr >> 32, req.addr >> 32):
                        return s
                elif req.type == IOREQ_TYPE_PIO:
                    if s.ranges[IoRangeType.PORT].contains(req.addr, req.addr + req.size - 1):
                        return s
                elif req.type == IOREQ_TYPE_COPY:
                    # Xen checks [addr, addr + size * count - 1], whatever df says.
                    if s.ranges[IoRangeType.MEMORY].contains(req.addr, req.addr + req.size * req.count - 1):
                        return s
        return None

    # --- one synchronous access (ioreq_send + wait_for_io) -------------------------------------

    def send(self, req: Ioreq, vcpu: int = 0, *, timeout: float | None = None) -> int:
        """Issue ``req`` on ``vcpu`` and return the final ``data`` (all-ones for an unclaimed read)."""
        server = self.select(req)
        if server is None:
            return all_ones(req.size) if req.dir == IOREQ_READ and not req.data_is_ptr else req.data
        lock = self._vcpu_locks.setdefault(vcpu, threading.Lock())
        with lock:
            return self._send(server, req, vcpu, self.timeout if timeout is None else timeout)

    def _send(self, server: Any, req: Ioreq, vcpu: int, timeout: float) -> int:
        off = vcpu * IOREQ_SIZE
        with self.xen.lock:
            page = server.page
            state = page[off + STATE_BYTE] & 0xF
            eport = int.from_bytes(page[off + 24 : off + 28], "little")
            if state != STATE_IOREQ_NONE or eport != server.vcpu_ports[vcpu]:
                raise GuestCrash(f"dom{self.domid} vCPU{vcpu}: device model set bad IO state {state}/port {eport}")
            body = Ioreq(
                req.addr,
                req.data,
                req.count,
                req.size,
                eport,
                STATE_IOREQ_NONE,
                req.data_is_ptr,
                req.dir,
                req.df,
                req.type,
            ).to_bytes()
            page[off : off + IOREQ_SIZE] = body
            page[off + STATE_BYTE] = (page[off + STATE_BYTE] & 0xF0) | STATE_IOREQ_READY  # after the body
            port = server.vcpu_ports[vcpu]
        self.xen.evtchn_notify_from_xen(self.domid, port)
        deadline = time.monotonic() + timeout
        prev, woken = STATE_IOREQ_READY, True
        while True:
            with self.xen.lock:
                # Like wait_on_xen_event_channel, the state is looked at only on entry
                # and when the DM's notify wakes us: an answer without a notify is lost.
                # An answer notified before the server went away is still taken: the
                # notify made the vCPU runnable before the destroy paused the domain.
                state = page[off + STATE_BYTE] & 0xF if woken else prev
                if state < prev or state > STATE_IORESP_READY:
                    raise GuestCrash(f"dom{self.domid} vCPU{vcpu}: weird ioreq state transition {prev} -> {state}")
                prev = state
                if state == STATE_IORESP_READY:
                    page[off + STATE_BYTE] = (page[off + STATE_BYTE] & 0xF0) | STATE_IOREQ_NONE
                    return int.from_bytes(page[off + 8 : off + 16], "little")
                if self._domain().servers.get(server.id) is not server:
                    # The emulator died under us: wait_for_io sees STATE_IOREQ_NONE and
                    # completes the access with ~0 ("emulator is dying" in xen/common/ioreq.c).
                    return all_ones(req.size) if req.dir == IOREQ_READ else req.data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(self.domid, vcpu, req, timeout, state)
            # Short waits only so that a destroyed server is noticed.
            woken = server.wait_dm_notify(vcpu, min(remaining, 0.05))

    # --- buffered writes (ioreq_send_buffered) --------------------------------------------------

    def send_buffered(self, type: int, addr: int, size: int, data: int) -> bool:
        """Queue a write in the buffered ring of the server that claims it; False if the
        ring is full or nobody can take it (Xen would then use the synchronous path)."""
        req = Ioreq(addr, data, 1, size, 0, 0, False, IOREQ_WRITE, False, type)
        server = self.select(req)
        if server is None or server.bufpage is None or addr > 0xFFFFF or size not in (1, 2, 4, 8):
            return False
        with self.xen.lock:
            pg = server.bufpage
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
            port = server.bufioreq_port
        self.xen.evtchn_notify_from_xen(self.domid, port)
        return True

    # --- instructions ---------------------------------------------------------------------------

    def _pio(self, port: int, size: int, dir: int, value: int = 0, vcpu: int = 0) -> int:
        return self.send(Ioreq(port, value, 1, size, 0, 0, False, dir, False, IOREQ_TYPE_PIO), vcpu)

    def outb(self, port: int, value: int, vcpu: int = 0) -> None:
        self._pio(port, 1, IOREQ_WRITE, value, vcpu)

    def outw(self, port: int, value: int, vcpu: int = 0) -> None:
        self._pio(port, 2, IOREQ_WRITE, value, vcpu)

    def outl(self, port: int, value: int, vcpu: int = 0) -> None:
        self._pio(port, 4, IOREQ_WRITE, value, vcpu)

    def inb(self, port: int, vcpu: int = 0) -> int:
        return self._pio(port, 1, IOREQ_READ, 0, vcpu)

    def inw(self, port: int, vcpu: int = 0) -> int:
        return self._pio(port, 2, IOREQ_READ, 0, vcpu)

    def inl(self, port: int, vcpu: int = 0) -> int:
        return self._pio(port, 4, IOREQ_READ, 0, vcpu)

    def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        return self.send(Ioreq(addr, 0, 1, size, 0, 0, False, IOREQ_READ, False, IOREQ_TYPE_COPY), vcpu)

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self.send(Ioreq(addr, value, 1, size, 0, 0, False, IOREQ_WRITE, False, IOREQ_TYPE_COPY), vcpu)

    def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        addr = (sbdf << 32) | reg
        return self.send(Ioreq(addr, 0, 1, size, 0, 0, False, IOREQ_READ, False, IOREQ_TYPE_PCI_CONFIG), vcpu)

    def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        addr = (sbdf << 32) | reg
        self.send(Ioreq(addr, value, 1, size, 0, 0, False, IOREQ_WRITE, False, IOREQ_TYPE_PCI_CONFIG), vcpu)

    def rep_outsb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        """``rep outsb`` from guest RAM at ``gpa`` (the last byte when ``df``)."""
        self.send(Ioreq(port, gpa, count, 1, 0, 0, True, IOREQ_WRITE, df, IOREQ_TYPE_PIO), vcpu)

    def rep_insb(self, port: int, gpa: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self.send(Ioreq(port, gpa, count, 1, 0, 0, True, IOREQ_READ, df, IOREQ_TYPE_PIO), vcpu)

    def rep_movs_to_mmio(self, addr: int, gpa: int, size: int, count: int, *, df: bool = False, vcpu: int = 0) -> None:
        self.send(Ioreq(addr, gpa, count, size, 0, 0, True, IOREQ_WRITE, df, IOREQ_TYPE_COPY), vcpu)

    # --- RAM --------------------------------------------------------------------------------------

    def write_ram(self, gpa: int, data: bytes) -> None:
        self.xen.guest_write(self.domid, gpa, data)

    def read_ram(self, gpa: int, n: int) -> bytes:
        return bytes(self.xen.guest_read(self.domid, gpa, n))
