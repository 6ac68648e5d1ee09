"""The dispatch core: answer the ioreqs a guest's vCPUs post in the shared pages.

Pure: it reads and writes a synchronous ioreq page (one 32-byte ``struct ioreq``
per vCPU) and a buffered ring page given as writable buffers, calls plain Python
devices, and reaches guest RAM through a ``GuestMemory``.  Event channels, the
DMOPs and the loop live in ``server.py``; the tests drive this module with
``bytearray`` pages.

State machine and memory ordering
---------------------------------
Xen (``ioreq_send`` in ``xen/common/ioreq.c``) fills a slot, sets
``STATE_IOREQ_READY`` and notifies; it then waits (``wait_for_io``) and crashes the
guest if it ever sees the state go backwards or an unknown value.  So this module
only makes the transitions READY → INPROCESS → IORESP_READY, in that order, and
never writes a slot whose state it did not just read as READY / write as INPROCESS
(as ``cpu_get_ioreq``/``cpu_handle_ioreq`` in QEMU's ``xen-hvm-common.c``).

How the writes are ordered, in CPython:

* Every store into the page is one plain machine store: the state is a single
  byte (``page[off + 30] = b``), ``data`` one aligned 8-byte store (a native
  ``"Q"`` ``Struct.pack_into``: one 8-byte ``memcpy``), the ring's
  ``read_pointer`` one aligned 4-byte store through a cast to ``"I"``.  There is no fence instruction in any of them.
* Program order is kept by the compiler: each store happens inside a separate
  call of the interpreter's C code (opaque to the optimiser), so ``data`` is
  stored before ``state`` in the machine code as in the source.
* On x86 (TSO) stores become visible in program order and loads are not
  reordered with older loads, so "write data, then IORESP_READY" and "read
  READY, then the fields" need no barrier; the ``IOCTL_EVTCHN_NOTIFY`` syscall
  that follows is serialising anyway.  The GIL only matters between Python
  threads of this process (the mock's simulated vCPUs): its acquire/release
  are full barriers, and one thread serves one server's pages.
* Arm64 is weakly ordered: QEMU's ``xen_rmb``/``xen_wmb`` become ``dmb``, and
  pure Python cannot emit one.  This module is therefore only trusted on x86;
  ``server.py`` warns on other architectures.

The guest is untrusted
----------------------
Every ioreq is copied once out of the page (one ``Struct.unpack_from``) and only
the copy is looked at (no double fetch): the common access (a port or MMIO read
or write of one element) straight from those locals, anything else as an
``Ioreq`` built from them; both paths apply the same checks.  A size other
than 1/2/4/8 (1/2/4 for ports and PCI config), a ``count`` above ``max_rep``, a
``data_is_ptr`` address outside guest RAM, a rep access whose span leaves the
device's range or wraps, an unknown type: each is refused — reads complete with
all-ones, writes are dropped, the slot still goes to IORESP_READY so the vCPU
never stalls — counted in ``stats`` and logged at most a few times per second
per reason.  Work per ioreq is bounded by ``max_rep`` elements and memory by one
element, whatever the guest asked for.  A device that raises is logged with its
traceback (rate-limited) and the access completes as a refused one.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from struct import Struct
from typing import Protocol, runtime_checkable

from ..abi.ioreq import (
    IOREQ_BUFFER_SLOT_NUM,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
)
from ..abi.ioreq_slot import IOREQ_SIZE, IOREQ_SLOT, STATE_BYTE, Ioreq, all_ones
from ..checks import check_int

log = logging.getLogger("xendmop.runtime")
#: every ioreq answered, at DEBUG, when enabled (``--trace``): see ``Dispatcher.handle_slot_traced``
trace = logging.getLogger("xendmop.ioreq")

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
#: the data field at offset 8; native "Q" packs with one 8-byte memcpy (one aligned store on
#: x86), where "<Q" would write byte by byte
_DATA = Struct("Q")
#: the value mask per access size (index = size in bytes), for the sizes the fast path takes
_SIZE_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF, 0, 0, 0, _U64)
#: access sizes accepted for ports and PCI config (32 bits at most) and for MMIO (``data``'s width)
_PORT_SIZES = frozenset((1, 2, 4))
_MMIO_SIZES = frozenset((1, 2, 4, 8))
#: Rep elements handled per ioreq.  Xen's emulator clips a rep string access so
#: that its guest-side span stays within one page (``hvmemul_*`` rep handlers), so
#: an honest count never exceeds 4096; anything larger is refused whole.
MAX_REP = 4096
#: the largest ``max_rep`` a dispatcher takes: 2**20 elements of at most 8 bytes, 8 MiB per ioreq
MAX_REP_LIMIT = 1 << 20
#: PCI Express extended configuration space.
PCI_CONFIG_SPACE_SIZE = 4096
#: byte 30 of a buffered entry's ioreq: READY, a write (``IOREQ_WRITE`` is 0), no data_is_ptr or df
_BUFFERED_FLAGS = STATE_IOREQ_READY | (IOREQ_WRITE << 5)
#: ``buffered_iopage``: read_pointer @0, write_pointer @4, slots of 8 bytes @8
BUF_SLOT_BASE = 8


# --- the device protocol -----------------------------------------------------------


@runtime_checkable
class IoDevice(Protocol):
    """A device: ``addr`` is the offset from the start of the range it was registered
    for (the register offset for PCI config space), ``size`` is 1, 2, 4 or 8."""

    def read(self, addr: int, size: int) -> int: ...

    def write(self, addr: int, size: int, value: int) -> None: ...


class GuestMemoryError(Exception):
    """A guest-physical access outside what the guest owns (unmapped, or not RAM)."""


class GuestMemory(Protocol):
    """Guest RAM as the device model reaches it (``ForeignMemory``-backed in servers)."""

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa`` or ``GuestMemoryError``."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa`` or ``GuestMemoryError`` (nothing written past the fault)."""
        ...

    def invalidate(self) -> None:
        """Drop cached mappings (``IOREQ_TYPE_INVALIDATE``: the guest's p2m changed)."""
        ...


# --- ranges ------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A device registered for ``[start, end]`` (inclusive, as Xen's rangesets)."""

    start: int
    end: int
    device: IoDevice
    name: str

    def covers(self, lo: int, hi: int) -> bool:
        return self.start <= lo and hi <= self.end


class RangeMap:
    """Non-overlapping inclusive ranges → devices; lookups are O(log n)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._starts: list[int] = []
        self._regions: list[Region] = []

    def add(self, start: int, end: int, device: IoDevice, name: str = "") -> Region:
        if not 0 <= start <= end <= _U64:
            raise ValueError(f"{self.kind} range [{start:#x}, {end:#x}] is empty or out of range")
        i = bisect.bisect_right(self._starts, end)
        if i and self._regions[i - 1].end >= start:
            other = self._regions[i - 1]
            raise ValueError(f"{self.kind} range [{start:#x}, {end:#x}] overlaps {other.name or other.device!r}")
        region = Region(start, end, device, name or type(device).__name__)
        self._starts.insert(i, start)
        self._regions.insert(i, region)
        return region

    def remove(self, start: int, end: int) -> Region:
        i = bisect.bisect_left(self._starts, start)
        if i == len(self._starts) or self._regions[i].start != start or self._regions[i].end != end:
            raise KeyError(f"no {self.kind} range [{start:#x}, {end:#x}]")
        del self._starts[i]
        return self._regions.pop(i)

    def find(self, lo: int, hi: int) -> Region | None:
        """The region containing all of ``[lo, hi]``, or None."""
        i = bisect.bisect_right(self._starts, lo)
        if i == 0:
            return None
        region = self._regions[i - 1]
        return region if region.covers(lo, hi) else None

    def __iter__(self) -> Iterator[Region]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)


# --- refusals ---------------------------------------------------------------------


class Refused(Exception):
    """An ioreq this core will not carry out; ``reason`` is a fixed key (bounded log keys)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- logging that a guest cannot flood --------------------------------------------


class RateLimitedLog:
    """At most ``burst`` messages per ``interval`` seconds per key; then a count of
    what was suppressed.  Keys are fixed strings chosen by this module, never
    guest values, so the table stays small whatever the guest does."""

    def __init__(
        self,
        logger: logging.Logger = log,
        burst: int = 5,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, shown, suppressed)

    def __call__(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = self.clock()
        start, shown, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.interval:
            if suppressed:
                self.logger.log(level, "%s: %d similar messages suppressed", key, suppressed)
            start, shown, suppressed = now, 0, 0
        if shown < self.burst:
            self.logger.log(level, msg, *args, exc_info=exc_info)
            shown += 1
        else:
            suppressed += 1
        self._windows[key] = (start, shown, suppressed)


# --- the buffered ring's read pointer ------------------------------------------------


class ReadPointer(Protocol):
    """How the consumer advances ``read_pointer`` by ``n`` after handling slots."""

    def advance(self, ptrs: memoryview, old: int, n: int) -> None: ...


class StoreReadPointer:
    """One aligned 32-bit store of ``old + n``.

    Safe for ``HVM_IOREQSRV_BUFIOREQ_LEGACY``: Xen never writes ``read_pointer``
    in that mode (``ioreq_send_buffered`` only bumps ``write_pointer``), so the
    device model is its only writer and a plain store cannot lose an update.
    Not safe for ``ATOMIC``: there Xen may ``cmpxchg`` the 64-bit pair to subtract
    a multiple of 511 from both pointers between our load and our store, and a
    store of the stale ``old + n`` would undo that subtraction for
    ``read_pointer`` alone, putting it far past ``write_pointer``.  Use
    ``AtomicAddReadPointer`` for ATOMIC (QEMU uses ``qatomic_add``).
    """

    def advance(self, ptrs: memoryview, old: int, n: int) -> None:
        ptrs[0] = (old + n) & _U32


class AtomicAddReadPointer:
    """``__atomic_fetch_add_4`` (libatomic, a ``lock xadd`` on x86) through ctypes.

    Required for ``HVM_IOREQSRV_BUFIOREQ_ATOMIC`` (see ``StoreReadPointer``): the
    add composes with Xen's concurrent ``cmpxchg`` of the pointer pair, as QEMU's
    ``qatomic_add`` does.  Raises ``OSError`` when libatomic is not installed.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("atomic")
        if name is None:
            raise OSError(errno.ENOENT, "libatomic not found: BUFIOREQ_ATOMIC needs an atomic add")
        fn = ctypes.CDLL(name)["__atomic_fetch_add_4"]
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        fn.restype = ctypes.c_uint32
        self._fetch_add = fn

    def advance(self, ptrs: memoryview, old: int, n: int) -> None:
        cell = ctypes.c_uint32.from_buffer(ptrs)
        try:
            self._fetch_add(ctypes.addressof(cell), n, _ATOMIC_SEQ_CST)
        finally:
            del cell  # release the buffer export at once


_ATOMIC_SEQ_CST = 5


# --- the dispatcher ------------------------------------------------------------------


class Dispatcher:
    """Routes ioreqs to devices registered for port ranges, MMIO ranges or PCI functions.

    ``memory``: guest RAM for ``data_is_ptr`` forms (without it those are refused).
    ``on_timeoffset(delta)``: called for ``IOREQ_TYPE_TIMEOFFSET`` (the guest moved its RTC).
    ``max_rep``: rep elements handled per ioreq; larger counts are refused.
    """

    def __init__(
        self,
        memory: GuestMemory | None = None,
        *,
        on_timeoffset: Callable[[int], None] | None = None,
        max_rep: int = MAX_REP,
        ratelog: RateLimitedLog | None = None,
    ) -> None:
        self.memory = memory
        self.on_timeoffset = on_timeoffset
        # ioreq.count is a uint32 (xen/include/public/hvm/ioreq.h); 0 refuses every counted
        # access, and past MAX_REP_LIMIT one ioreq could make the core gather 8 MiB or more
        self.max_rep = check_int("Dispatcher", "max_rep", max_rep, 0, MAX_REP_LIMIT)
        self.ports = RangeMap("port")
        self.mmio = RangeMap("mmio")
        self.pci: dict[int, Region] = {}
        self.stats: Counter[str] = Counter()
        self.ratelog = ratelog or RateLimitedLog()

    # --- registration (the server mirrors these into Xen's rangesets) ----------------

    def add_pci(self, sbdf: int, device: IoDevice, name: str = "") -> Region:
        if sbdf in self.pci:
            raise ValueError(f"PCI function {sbdf:#x} is taken")
        self.pci[sbdf] = Region(0, PCI_CONFIG_SPACE_SIZE - 1, device, name or type(device).__name__)
        return self.pci[sbdf]

    def remove_pci(self, sbdf: int) -> Region:
        return self.pci.pop(sbdf)

    # --- the synchronous page ----------------------------------------------------------

    def handle_slot(self, page: memoryview, vcpu: int) -> bool:
        """Answer vCPU ``vcpu``'s slot if it is READY; True when the caller must notify.

        ``page`` is the writable ioreq page (``memoryview`` of ``"B"``).  The common
        access — a port or MMIO read or write of one element, data in the slot, inside a
        registered range — is carried out here with one device call; every other ioreq
        (rep, ``data_is_ptr``, PCI config, odd sizes, unclaimed or wrapping addresses,
        other types) goes through ``execute``.  Both give the same slot bytes, device
        calls and ``stats`` (``handle_slot_generic`` is the reference the tests compare).
        """
        off = vcpu * IOREQ_SIZE
        if vcpu < 0 or off + IOREQ_SIZE > len(page):
            raise IndexError(f"vCPU {vcpu} has no slot in a {len(page)}-byte page")
        state_at = off + STATE_BYTE
        flags = page[state_at]
        if flags & 0xF != STATE_IOREQ_READY:
            # A stale or spurious event: QEMU's cpu_get_ioreq also leaves such a slot alone.
            self.stats["not-ready"] += 1
            return False
        # READY seen; on x86 the later loads are not reordered before this one (QEMU: xen_rmb).
        page[state_at] = (flags & 0xF0) | STATE_IOREQ_INPROCESS
        # The private copy, every byte read once (no double fetch): only these locals are used.
        addr, data, count, size, vp_eport, flags, type_ = IOREQ_SLOT.unpack_from(page, off)
        region = None
        if not flags & 0x10:  # data in the slot (no data_is_ptr)
            # The size checks are _pio's and _copy's; count is not looked at for a port
            # access without data_is_ptr (_pio, as QEMU's cpu_ioreq_pio), and must be 1 here
            # for MMIO (more elements, or none, take _copy's rep path).
            if type_ == IOREQ_TYPE_PIO:
                ranges = self.ports if size in _PORT_SIZES else None
            elif type_ == IOREQ_TYPE_COPY and count == 1 and self.max_rep >= 1:
                ranges = self.mmio if size in _MMIO_SIZES else None
            else:
                ranges = None
            if ranges is not None:
                # RangeMap.find inlined; an access whose last byte is past the region (or
                # past 2**64 - 1) is left to execute, which refuses or floats it.
                i = bisect.bisect_right(ranges._starts, addr)
                if i:
                    region = ranges._regions[i - 1]
                    if addr + size - 1 > region.end:
                        region = None
        if region is None:
            data = self.execute(Ioreq.from_fields(addr, data, count, size, vp_eport, flags, type_))
        else:
            # What execute -> _pio/_copy -> _dev_read/_dev_write do for this access.
            offset = addr - region.start
            mask = _SIZE_MASK[size]
            if flags & 0x20:  # dir == IOREQ_READ
                try:
                    data = region.device.read(offset, size)
                    if data.__class__ is not int and not isinstance(data, int):
                        raise TypeError(f"read returned {type(data).__name__}, not int")
                    if data & ~mask:  # more bits than the access (or negative): the device's bug, not truncated
                        raise ValueError(f"read returned {data:#x}, which does not fit {size} byte(s)")
                except Exception:
                    data = self._read_failed(region, offset, size)
            else:
                data &= mask  # QEMU's handle_ioreq masks write data to the size
                try:
                    region.device.write(offset, size, data)
                except Exception:
                    self._write_failed(region, offset, size, data)
            self.stats["handled"] += 1
        # _respond inlined: data, then IORESP_READY if the slot is still INPROCESS.
        _DATA.pack_into(page, off + 8, data & _U64)  # one aligned 8-byte store
        flags = page[state_at]
        if flags & 0xF != STATE_IOREQ_INPROCESS:
            return self._badness(vcpu, flags)
        page[state_at] = (flags & 0xF0) | STATE_IORESP_READY  # data before state: see the docstring
        return True

    def handle_slot_traced(self, page: memoryview, vcpu: int) -> bool:
        """``handle_slot``, logging each ioreq answered (vCPU, type, direction, address, size,
        data, the answer) at DEBUG on the ``xendmop.ioreq`` logger: what ``--trace`` shows.
        The slot is read once more for the log only; the access itself is ``handle_slot``'s."""
        off = vcpu * IOREQ_SIZE
        req = None
        if 0 <= off and off + IOREQ_SIZE <= len(page) and page[off + STATE_BYTE] & 0xF == STATE_IOREQ_READY:
            req = Ioreq.from_bytes(page, off)
        notify = self.handle_slot(page, vcpu)
        if req is not None:
            (answer,) = _DATA.unpack_from(page, off + 8)
            trace.debug("vCPU %d: %s -> data=%#x", vcpu, req, answer)
        return notify

    def handle_slot_generic(self, page: memoryview, vcpu: int) -> bool:
        """``handle_slot`` with every ioreq through ``execute`` (no fast path): the
        reference the fast path must match, byte for byte and call for call."""
        off = vcpu * IOREQ_SIZE
        if vcpu < 0 or off + IOREQ_SIZE > len(page):
            raise IndexError(f"vCPU {vcpu} has no slot in a {len(page)}-byte page")
        if page[off + STATE_BYTE] & 0xF != STATE_IOREQ_READY:
            self.stats["not-ready"] += 1
            return False
        page[off + STATE_BYTE] = (page[off + STATE_BYTE] & 0xF0) | STATE_IOREQ_INPROCESS
        req = Ioreq.from_bytes(page, off)  # the private copy, read once
        return self._respond(page, off, vcpu, self.execute(req))

    def resume_slot(self, page: memoryview, vcpu: int) -> bool:
        """Answer the slot a previous device model of this server left behind (a takeover);
        True when the caller must notify the vCPU's port.

        READY: not seen by the previous device model; handled as ``handle_slot`` does, once.
        INPROCESS: taken by it, perhaps carried out, not answered; carried out again from the
        slot's fields (the request stays in the slot until IORESP_READY: ``ioreq_send`` in
        xen/common/ioreq.c wrote it, and only the device model writes ``data``, which for a
        write it stores unchanged and for a read is an output) and answered.  The state is
        never written back to READY: ``wait_for_io`` crashes the domain on a state that goes
        backwards.  A device's write with side effects may so be applied twice.
        IORESP_READY: answered, perhaps never notified: the caller notifies (a vCPU that
        already took the answer ignores the event: ``wait_for_io`` looks only at its own slot).
        NONE: nothing waits."""
        off = vcpu * IOREQ_SIZE
        if vcpu < 0 or off + IOREQ_SIZE > len(page):
            raise IndexError(f"vCPU {vcpu} has no slot in a {len(page)}-byte page")
        state = page[off + STATE_BYTE] & 0xF
        if state == STATE_IOREQ_READY:
            return self.handle_slot(page, vcpu)
        if state == STATE_IOREQ_INPROCESS:
            self.stats["resumed-inprocess"] += 1
            req = Ioreq.from_bytes(page, off)  # the private copy, read once
            return self._respond(page, off, vcpu, self.execute(req))
        if state == STATE_IORESP_READY:
            self.stats["resumed-answered"] += 1
            return True
        return False

    def _respond(self, page: memoryview, off: int, vcpu: int, data: int) -> bool:
        """Store ``data``, then IORESP_READY if the slot is still INPROCESS."""
        _DATA.pack_into(page, off + 8, data & _U64)  # one aligned 8-byte store
        flags = page[off + STATE_BYTE]
        if flags & 0xF != STATE_IOREQ_INPROCESS:
            return self._badness(vcpu, flags)
        # data before state: two stores in program order (see the module docstring), kept
        # visible in that order by x86 TSO (QEMU: xen_wmb).
        page[off + STATE_BYTE] = (flags & 0xF0) | STATE_IORESP_READY
        return True

    def _badness(self, vcpu: int, flags: int) -> bool:
        # Only Xen could have changed the state, and Xen does not while INPROCESS: do not
        # touch the slot further (QEMU reports "Badness in I/O request").
        self.ratelog(
            logging.ERROR, "badness", "vCPU %d slot left INPROCESS (state %d); not answering", vcpu, flags & 0xF
        )
        self.stats["badness"] += 1
        return False

    def execute(self, req: Ioreq) -> int:
        """Carry out one ioreq copy; return the value ``data`` must hold afterwards.

        Never raises: a refusal or a bug of ours completes the access as refused.
        """
        try:
            data = req.data
            if not req.data_is_ptr and req.dir == IOREQ_WRITE and 1 <= req.size < 8:
                data &= all_ones(req.size)  # QEMU's handle_ioreq masks write data to the size
            handler = _HANDLERS.get(req.type)
            if handler is None:
                raise Refused("type", f"unknown ioreq type {req.type}")
            result = handler(self, req, data)
            self.stats["handled"] += 1
            return result
        except Refused as e:
            self.stats[f"refused:{e.reason}"] += 1
            self.ratelog(logging.WARNING, e.reason, "refused ioreq (%s): %s", e, req)
        except Exception:  # our own bug must not take the loop (and the guest) down
            self.stats["internal-error"] += 1
            self.ratelog(logging.ERROR, "internal", "internal error handling %s", req, exc_info=True)
        return all_ones(req.size) if req.dir == IOREQ_READ and not req.data_is_ptr else req.data

    # --- helpers -----------------------------------------------------------------------

    def _count(self, req: Ioreq) -> int:
        if req.count > self.max_rep:
            raise Refused("count", f"count {req.count} > {self.max_rep}")
        return req.count

    @staticmethod
    def _element(base: int, req: Ioreq, i: int) -> int:
        """Address of rep element ``i`` (QEMU's rw_phys_req_item: ``df`` steps down)."""
        step = -req.size if req.df else req.size
        addr = base + i * step
        if not 0 <= addr <= _U64 - (req.size - 1):
            raise Refused("wrap", f"element {i} at {addr:#x} leaves the address space")
        return addr

    def _span(self, base: int, req: Ioreq, count: int) -> tuple[int, int]:
        """Lowest and highest byte the ``count`` elements from ``base`` touch."""
        first, last = self._element(base, req, 0), self._element(base, req, count - 1)
        lo = min(first, last)
        return lo, max(first, last) + req.size - 1

    def _dev_read(self, region: Region, offset: int, size: int) -> int:
        try:
            value = region.device.read(offset, size)
            if not isinstance(value, int):
                raise TypeError(f"read returned {type(value).__name__}, not int")
            mask = all_ones(size)
            if value & ~mask:  # an int subclass's & raising is the device's fault too
                raise ValueError(f"read returned {value:#x}, which does not fit {size} byte(s)")
            return value & mask
        except Exception:
            return self._read_failed(region, offset, size)

    def _read_failed(self, region: Region, offset: int, size: int) -> int:
        """Log the exception being handled (a device's read raised) and float the bus."""
        self.stats["device-error"] += 1
        self.stats["device-error-read"] += 1
        self.ratelog(
            logging.ERROR, "device", "device %s raised on read(%#x, %d)", region.name, offset, size, exc_info=True
        )
        return all_ones(size)

    def _dev_write(self, region: Region, offset: int, size: int, value: int) -> None:
        value &= all_ones(size)
        try:
            region.device.write(offset, size, value)
        except Exception:
            self._write_failed(region, offset, size, value)

    def _write_failed(self, region: Region, offset: int, size: int, value: int) -> None:
        """Log the exception being handled (a device's write raised); the write is dropped."""
        self.stats["device-error"] += 1
        self.stats["device-error-write"] += 1
        self.ratelog(
            logging.ERROR,
            "device",
            "device %s raised on write(%#x, %d, %#x)",
            region.name,
            offset,
            size,
            value,
            exc_info=True,
        )

    def _mem(self) -> GuestMemory:
        if self.memory is None:
            raise Refused("no-memory", "data_is_ptr without a guest memory accessor")
        return self.memory

    def _mem_read(self, gpa: int, size: int) -> int:
        try:
            raw = self._mem().read(gpa, size)
        except GuestMemoryError as e:
            raise Refused("guest-memory", str(e)) from None
        return int.from_bytes(raw[:size], "little")

    def _mem_write(self, gpa: int, size: int, value: int) -> None:
        try:
            self._mem().write(gpa, (value & all_ones(size)).to_bytes(size, "little"))
        except GuestMemoryError as e:
            raise Refused("guest-memory", str(e)) from None

    def _unclaimed(self, kind: str, req: Ioreq, data: int) -> int:
        # Xen routed it here but no device answers: a floating bus.
        self.stats[f"unclaimed:{kind}"] += 1
        self.ratelog(logging.INFO, f"unclaimed-{kind}", "no device for %s", req)
        return all_ones(req.size) if req.dir == IOREQ_READ and not req.data_is_ptr else data

    # --- per type (QEMU: cpu_ioreq_pio, cpu_ioreq_move, cpu_ioreq_config) ----------------

    def _pio(self, req: Ioreq, data: int) -> int:
        if req.size not in (1, 2, 4):  # cpu_ioreq_pio: ports are at most 32 bits wide
            raise Refused("size", f"port access of size {req.size}")
        region = self.ports.find(req.addr, req.addr + req.size - 1)
        if region is None:
            return self._unclaimed("port", req, data)
        offset = req.addr - region.start
        if not req.data_is_ptr:
            if req.dir == IOREQ_READ:
                return self._dev_read(region, offset, req.size)
            self._dev_write(region, offset, req.size, data)
            return data
        # rep ins/outs: the port stays, the guest buffer steps by size (df: down).
        count = self._count(req)
        if count:
            self._span(req.data, req, count)  # refuse a wrapping buffer before any side effect
        for i in range(count):
            self._move(region, offset, self._element(req.data, req, i), req)
        return data

    def _move(self, region: Region, offset: int, gpa: int, req: Ioreq) -> None:
        """One element of a ``data_is_ptr`` transfer between the device and guest RAM."""
        if req.dir == IOREQ_READ:
            self._mem_write(gpa, req.size, self._dev_read(region, offset, req.size))
        else:
            self._dev_write(region, offset, req.size, self._mem_read(gpa, req.size))

    def _copy(self, req: Ioreq, data: int) -> int:
        if req.size not in (1, 2, 4, 8):  # cpu_ioreq_move: at most sizeof(data)
            raise Refused("size", f"MMIO access of size {req.size}")
        count = self._count(req)
        if count == 0:
            return data
        lo, hi = self._span(req.addr, req, count)
        region = self.mmio.find(lo, hi)
        if region is None:
            if self.mmio.find(req.addr, req.addr + req.size - 1) is not None:
                raise Refused("range", f"rep span [{lo:#x}, {hi:#x}] runs past its device's range")
            return self._unclaimed("mmio", req, data)
        if req.data_is_ptr:
            self._span(req.data, req, count)
        for i in range(count):
            offset = self._element(req.addr, req, i) - region.start
            if not req.data_is_ptr:
                if req.dir == IOREQ_READ:
                    data = self._dev_read(region, offset, req.size)
                else:
                    self._dev_write(region, offset, req.size, data)
                continue
            self._move(region, offset, self._element(req.data, req, i), req)
        return data

    def _pci_config(self, req: Ioreq, data: int) -> int:
        sbdf, reg = req.addr >> 32, req.addr & _U32
        if req.size not in (1, 2, 4):
            raise Refused("size", f"PCI config access of size {req.size}")
        if req.count != 1:  # cpu_ioreq_config: config cycles are never rep
            raise Refused("count", f"PCI config access with count {req.count}")
        if reg + req.size > PCI_CONFIG_SPACE_SIZE:
            raise Refused("range", f"PCI config register {reg:#x}+{req.size} past config space")
        region = self.pci.get(sbdf)
        if region is None:
            return self._unclaimed("pci", req, data)
        if req.dir == IOREQ_READ:
            value = self._dev_read(region, reg, req.size)
            if req.data_is_ptr:
                self._mem_write(req.data, req.size, value)
                return data
            return value
        if req.data_is_ptr:
            data = self._mem_read(req.data, req.size)
        self._dev_write(region, reg, req.size, data)
        return req.data

    def _timeoffset(self, req: Ioreq, data: int) -> int:
        # Xen broadcasts the guest's RTC offset change (signed 64-bit); QEMU ignores it.
        if self.on_timeoffset is not None:
            delta = req.data - (1 << 64) if req.data >> 63 else req.data
            try:
                self.on_timeoffset(delta)
            except Exception:
                self.stats["device-error"] += 1
                self.ratelog(logging.ERROR, "timeoffset", "on_timeoffset raised", exc_info=True)
        return req.data

    def _invalidate(self, req: Ioreq, data: int) -> int:
        # The guest's p2m changed (e.g. ballooning): forget cached guest mappings
        # (QEMU: xen_invalidate_map_cache).
        if self.memory is not None:
            self.memory.invalidate()
        return req.data

    # --- the buffered ring (QEMU: handle_buffered_iopage) --------------------------------

    def drain_buffered(self, page: memoryview, pointer: ReadPointer | None = None) -> int:
        """Handle every complete entry of the buffered ring; return how many ioreqs.

        At most one ring's worth (511 slots) is consumed per call, so a producer
        that keeps writing cannot hold the loop; what is left is seen on the next
        event.  Xen buffers only single writes (``ioreq_send_buffered``), so each
        entry runs as a write of count 1 without ``data_is_ptr``; an 8-byte write
        takes two slots, the second carrying the high 32 bits.
        """
        pointer = pointer or StoreReadPointer()
        ptrs = page[:8].cast("I")  # aligned 32-bit loads and stores of the two pointers
        slots = page[BUF_SLOT_BASE : BUF_SLOT_BASE + 8 * IOREQ_BUFFER_SLOT_NUM].cast("I")
        handled = budget = 0
        while budget < IOREQ_BUFFER_SLOT_NUM:
            rd = ptrs[0]
            wr = ptrs[1]  # read after rd: on x86 loads stay in order (QEMU: xen_rmb)
            if rd == wr:
                break
            pending = (wr - rd) & _U32
            if pending > IOREQ_BUFFER_SLOT_NUM:
                self.stats["refused:ring"] += 1
                self.ratelog(logging.ERROR, "ring", "buffered ring pointers inconsistent (read %d, write %d)", rd, wr)
                break
            word, low = slots[2 * (rd % IOREQ_BUFFER_SLOT_NUM)], slots[2 * (rd % IOREQ_BUFFER_SLOT_NUM) + 1]
            size = 1 << ((word >> 10) & 3)
            used = 2 if size == 8 else 1
            if pending < used:
                # Xen publishes both halves of a quad word together; wait for the rest.
                self.stats["ring-partial"] += 1
                break
            data = low
            if used == 2:
                data |= slots[2 * ((rd + 1) % IOREQ_BUFFER_SLOT_NUM) + 1] << 32
            # A write (dir 0: QEMU treats every buffered entry as one, as Xen queues only
            # writes) of one element, no data_is_ptr, no df: flags hold only the state.
            self.execute(Ioreq.from_fields((word >> 12) & 0xFFFFF, data, 1, size, 0, _BUFFERED_FLAGS, word & 0xFF))
            pointer.advance(ptrs, rd, used)
            handled += 1
            budget += used
        return handled


_HANDLERS: dict[int, Callable[[Dispatcher, Ioreq, int], int]] = {
    IOREQ_TYPE_PIO: Dispatcher._pio,
    IOREQ_TYPE_COPY: Dispatcher._copy,
    IOREQ_TYPE_PCI_CONFIG: Dispatcher._pci_config,
    IOREQ_TYPE_TIMEOFFSET: Dispatcher._timeoffset,
    IOREQ_TYPE_INVALIDATE: Dispatcher._invalidate,
}
