"""In-memory pages, guest RAM and devices for driving the dispatch core without Xen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xendmop.abi.ioreq import IOREQ_BUFFER_SLOT_NUM, IOREQ_READ, STATE_IOREQ_READY
from xendmop.abi.ioreq_slot import IOREQ_SIZE, Ioreq
from xendmop.runtime.dispatch import GuestMemoryError

PAGE = 4096


def page() -> memoryview:
    """A zeroed 4 KiB page as the core sees a mapped one."""
    return memoryview(bytearray(PAGE))


def post(pg: memoryview, vcpu: int, **fields: int) -> Ioreq:
    """Write a READY ioreq into ``vcpu``'s slot as Xen's ioreq_send would."""
    values: dict[str, int] = dict(
        addr=0,
        data=0,
        count=1,
        size=1,
        vp_eport=7 + vcpu,
        state=STATE_IOREQ_READY,
        data_is_ptr=0,
        dir=IOREQ_READ,
        df=0,
        type=0,
    )
    values.update(fields)
    req = Ioreq(**{k: bool(v) if k in ("data_is_ptr", "df") else v for k, v in values.items()})  # type: ignore[arg-type]
    pg[vcpu * IOREQ_SIZE : (vcpu + 1) * IOREQ_SIZE] = req.to_bytes()
    return req


def slot(pg: memoryview, vcpu: int) -> Ioreq:
    return Ioreq.from_bytes(bytes(pg[vcpu * IOREQ_SIZE : (vcpu + 1) * IOREQ_SIZE]))


class FakeRam:
    """``size`` bytes of guest RAM at gpa 0; every access outside it is refused and noted."""

    def __init__(self, size: int = 1 << 16) -> None:
        self.mem = bytearray(size)
        self.faults: list[tuple[int, int]] = []
        self.invalidations = 0

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or gpa + n > len(self.mem):
            self.faults.append((gpa, n))
            raise GuestMemoryError(f"gpa {gpa:#x}+{n} is not RAM")

    def read(self, gpa: int, size: int) -> bytes:
        self._check(gpa, size)
        return bytes(self.mem[gpa : gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.mem[gpa : gpa + len(data)] = data

    def invalidate(self) -> None:
        self.invalidations += 1


@dataclass
class Recorder:
    """A device that answers reads from ``regs`` (default ``0x11 * (offset + 1)``) and logs every call."""

    regs: dict[int, int] = field(default_factory=dict)
    calls: list[tuple[str, int, int, int | None]] = field(default_factory=list)

    def read(self, addr: int, size: int) -> int:
        self.calls.append(("r", addr, size, None))
        return self.regs.get(addr, (0x11 * (addr + 1)) & ((1 << (8 * size)) - 1))

    def write(self, addr: int, size: int, value: int) -> None:
        self.calls.append(("w", addr, size, value))
        self.regs[addr] = value


class Exploding:
    """A device with a bug."""

    def read(self, addr: int, size: int) -> int:
        raise ZeroDivisionError("device bug on read")

    def write(self, addr: int, size: int, value: int) -> None:
        raise KeyError("device bug on write")


def buf_entry(pg: memoryview, index: int, *, type: int, addr: int, size_log2: int, data: int, dir: int = 0) -> None:
    """Write buffered slot ``index`` (gcc's layout: one 32-bit word of bitfields, then data)."""
    word = (type & 0xFF) | ((dir & 1) << 9) | ((size_log2 & 3) << 10) | ((addr & 0xFFFFF) << 12)
    base = 8 + 8 * (index % IOREQ_BUFFER_SLOT_NUM)
    pg[base : base + 4] = word.to_bytes(4, "little")
    pg[base + 4 : base + 8] = (data & 0xFFFFFFFF).to_bytes(4, "little")


def set_pointers(pg: memoryview, read: int, write: int) -> None:
    pg[0:4] = (read & 0xFFFFFFFF).to_bytes(4, "little")
    pg[4:8] = (write & 0xFFFFFFFF).to_bytes(4, "little")


def pointers(pg: memoryview) -> tuple[int, int]:
    return int.from_bytes(pg[0:4], "little"), int.from_bytes(pg[4:8], "little")


class Producer:
    """Xen's ``ioreq_send_buffered`` for LEGACY mode: slots at ``write_pointer % 511``, then the bump."""

    def __init__(self, pg: memoryview) -> None:
        self.pg = pg

    def send(self, type: int, addr: int, size: int, data: int) -> bool:
        rd, wr = pointers(self.pg)
        need = 2 if size == 8 else 1
        if (wr - rd) & 0xFFFFFFFF > IOREQ_BUFFER_SLOT_NUM - need:
            return False  # ring full: Xen would take the synchronous path
        log2 = {1: 0, 2: 1, 4: 2, 8: 3}[size]
        buf_entry(self.pg, wr, type=type, addr=addr, size_log2=log2, data=data)
        if need == 2:
            buf_entry(self.pg, wr + 1, type=type, addr=addr, size_log2=log2, data=data >> 32)
        set_pointers(self.pg, rd, wr + need)
        return True


class RecordingPciHost:
    """A ``PciHost`` that records what a ``PciFunction`` asks of it: BAR (un)mappings, INTx, MSI."""

    def __init__(self) -> None:
        self.log: list[tuple[object, ...]] = []

    def map_bar(self, fn: Any, index: int, start: int) -> None:
        self.log.append(("map", index, start))

    def unmap_bar(self, fn: Any, index: int, start: int) -> None:
        self.log.append(("unmap", index, start))

    def set_intx(self, fn: Any, level: bool) -> None:
        self.log.append(("intx", level))

    def inject_msi(self, fn: Any, addr: int, data: int) -> None:
        self.log.append(("msi", addr, data))
