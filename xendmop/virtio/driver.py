"""A guest's virtio PCI driver, for the simulated guest on the mock: what Linux's
``virtio_pci_modern`` and ``virtio_ring`` do, as config, MMIO and RAM accesses.

``VirtioPciDriver(guest, sbdf)`` walks the capability list to the virtio structures
(the first capability of each type whose BAR is a memory BAR, as
``virtio_pci_find_capability``), sizes and programs the BARs, resets the device,
negotiates features (VIRTIO_F_VERSION_1 required, as Linux's modern driver), sets MSI-X
up with one vector for configuration changes and one per queue (``vp_find_vqs_msix``),
or falls back to INTx and the ISR, programs each queue (size, rings through two 32-bit
writes, vector read back, ``queue_notify_off``) and sets DRIVER_OK.  ``GuestQueue``
adds buffers, kicks (honouring VIRTIO_F_EVENT_IDX's ``avail_event`` or the used ring's
NO_NOTIFY flag) and takes used buffers back.

``guest``: a ``SimGuest`` (or ``RemoteGuest``): ``pci_config_read/write``,
``mmio_read/write``, ``write_ram``, ``read_ram``.  Nothing here is trusted by the device:
tests use the same class to build hostile rings (``GuestQueue.add_raw``).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

from . import mmio
from .spec import (
    COMMON_CFGGENERATION,
    COMMON_DF,
    COMMON_DFSELECT,
    COMMON_GF,
    COMMON_GFSELECT,
    COMMON_MSIX,
    COMMON_NUMQ,
    COMMON_Q_AVAILHI,
    COMMON_Q_AVAILLO,
    COMMON_Q_DESCHI,
    COMMON_Q_DESCLO,
    COMMON_Q_ENABLE,
    COMMON_Q_MSIX,
    COMMON_Q_NOFF,
    COMMON_Q_SELECT,
    COMMON_Q_SIZE,
    COMMON_Q_USEDHI,
    COMMON_Q_USEDLO,
    COMMON_STATUS,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_DEVICE_ID_MODERN_BASE,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_VENDOR_ID_REDHAT_QUMRANET,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Status,
    avail_size,
    desc_table_size,
    need_event,
    used_size,
)

__all__ = ["DriverError", "GuestQueue", "VirtioDriver", "VirtioMmioDriver", "VirtioPciDriver", "find_virtio"]

PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x2, 0x4
MSI_ADDRESS = 0xFEE00000  # the local APIC's window, destination 0, fixed delivery
FIRST_VECTOR = 0x30
PAGE = 4096


class DriverError(RuntimeError):
    """The device did not behave as a virtio 1.x PCI device must (what Linux would refuse)."""


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def find_virtio(guest: Any, device_type: int, *, bus: int = 0) -> int:
    """The SBDF of the first virtio PCI function of ``device_type`` on ``bus`` (scanning
    slots as firmware does); ``DriverError`` if there is none."""
    want = (PCI_DEVICE_ID_MODERN_BASE + device_type) << 16 | PCI_VENDOR_ID_REDHAT_QUMRANET
    for slot in range(32):
        sbdf = bus << 8 | slot << 3
        if guest.pci_config_read(sbdf, 0, 4) == want:
            return sbdf
    raise DriverError(f"no virtio device of type {device_type} on bus {bus}")


@dataclass
class Cap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    at: int  # where in config space


class Arena:
    """Guest RAM handed out in order.  Rings are kept (``keep=True``: below a floor that only
    rises); buffers wrap back to that floor at the end (reused once the device has given them
    back, as the tests use them), so a long run never writes buffers over a ring."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.floor = self.next = base

    def release(self) -> None:
        """Everything is free again (the device was reset: it holds no ring or buffer)."""
        self.floor = self.next = self.base

    def alloc(self, n: int, align: int = 16, *, keep: bool = False) -> int:
        n = max(n, 1)
        end = self.base + self.size
        if keep:
            addr = _align(self.floor, align)
            if addr + n > end:
                raise DriverError(f"{n} bytes of rings do not fit the guest's {self.size}-byte arena")
            self.floor = addr + n
            self.next = max(self.next, self.floor)
            return addr
        addr = _align(self.next, align)
        if addr + n > end:
            addr = _align(self.floor, align)
            if addr + n > end:
                raise DriverError(f"{n} bytes do not fit the guest's buffer arena above its rings")
        self.next = addr + n
        return addr


@dataclass
class Request:
    """What the guest made available: its head, and where its device-writable buffers are."""

    head: int
    descriptors: list[int]
    writable: list[tuple[int, int]] = field(default_factory=list)


class GuestQueue:
    """The driver's half of one split virtqueue."""

    def __init__(self, driver: VirtioDriver, index: int, size: int, desc: int, avail: int, used: int) -> None:
        self.driver, self.index, self.size = driver, index, size
        self.desc, self.avail, self.used = desc, avail, used
        self.notify_off = 0
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.free = list(range(size))
        self.avail_idx = 0  # the driver's next available index
        self.last_used = 0
        self.kicked_at = 0  # avail_idx at the last kick
        self.requests: dict[int, Request] = {}
        self.done: dict[int, Request] = {}  # what the last get_used gave back, by head
        self.kicks = 0

    @property
    def guest(self) -> Any:
        return self.driver.guest

    def _u16(self, gpa: int) -> int:
        return int.from_bytes(self.guest.read_ram(gpa, 2), "little")

    def _w16(self, gpa: int, value: int) -> None:
        self.guest.write_ram(gpa, (value & 0xFFFF).to_bytes(2, "little"))

    # --- making buffers available -----------------------------------------------------------------

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Make one request available: ``readable`` buffers (copied into guest RAM), then
        device-writable ones of the given lengths.  Returns its head; ``kick()`` to notify."""
        if not readable and not writable:
            raise DriverError(f"queue {self.index}: a request needs at least one buffer")
        arena = self.driver.arena
        segs: list[tuple[int, int, int]] = []
        for data in readable:
            addr = arena.alloc(len(data))
            self.guest.write_ram(addr, data)
            segs.append((addr, len(data), 0))
        out: list[tuple[int, int]] = []
        for n in writable:
            addr = arena.alloc(n)
            segs.append((addr, n, VIRTQ_DESC_F_WRITE))
            out.append((addr, n))
        if indirect:
            table = arena.alloc(16 * len(segs))
            raw = b"".join(
                VIRTQ_DESC.pack(a, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(segs) else 0), i + 1)
                for i, (a, n, f) in enumerate(segs)
            )
            self.guest.write_ram(table, raw)
            head = self._take(1)[0]
            self._write_desc(head, table, len(raw), VIRTQ_DESC_F_INDIRECT, 0)
            descs = [head]
        else:
            descs = self._take(len(segs))
            for i, (a, n, f) in enumerate(segs):
                last = i + 1 == len(segs)
                self._write_desc(descs[i], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else descs[i + 1])
        self.requests[descs[0]] = Request(descs[0], descs, out)
        self.publish(descs[0])
        return descs[0]

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise DriverError(f"queue {self.index}: {n} descriptors wanted, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def _write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.guest.write_ram(self.desc + 16 * i, VIRTQ_DESC.pack(addr, length, flags, nxt))

    def add_raw(self, descriptors: dict[int, tuple[int, int, int, int]], head: int) -> None:
        """Hostile or hand-made: write ``descriptors`` ({index: (addr, len, flags, next)}) as
        they are and put ``head`` in the available ring (nothing is checked)."""
        for i, (addr, length, flags, nxt) in descriptors.items():
            self._write_desc(i, addr, length, flags, nxt)
        self.publish(head)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available slot and move the index (after the slot: Linux's virtio_wmb)."""
        self._w16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._w16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        """Write the available index as it is (a hostile driver's jump)."""
        self.avail_idx = idx & 0xFFFF
        self._w16(self.avail + 2, self.avail_idx)

    def kick(self, *, force: bool = False) -> bool:
        """Notify the device if it asked to hear (``virtqueue_kick_prepare``); True if notified."""
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        if not force:
            if self.driver.event_idx:
                if not need_event(self._u16(self.used + 4 + 8 * self.size), new, old):
                    return False
            elif self._u16(self.used) & VIRTQ_USED_F_NO_NOTIFY:
                return False
        self.notify()
        return True

    def notify(self) -> None:
        """Write the queue's index to its notification address."""
        self.driver.notify_queue(self)
        self.kicks += 1

    # --- taking them back -------------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self._u16(self.used + 2)

    def get_used(self) -> list[tuple[int, int]]:
        """The (head, written length) pairs the device used since the last call; their
        descriptors are free again.  With EVENT_IDX ``used_event`` asks for the next one."""
        out = []
        self.done = {}
        idx = self.used_idx()
        while self.last_used != idx:
            elem = self.guest.read_ram(self.used + 4 + 8 * (self.last_used % self.size), 8)
            head, length = int.from_bytes(elem[:4], "little"), int.from_bytes(elem[4:], "little")
            self.last_used = (self.last_used + 1) & 0xFFFF
            req = self.requests.pop(head, None)
            if req is not None:
                self.free.extend(req.descriptors)
                self.done[head] = req
            out.append((head, length))
        if self.driver.event_idx:
            self._w16(self.avail + 4 + 2 * self.size, self.last_used)
        return out

    def take_data(self) -> list[tuple[int, bytes]]:
        """``get_used``, with the bytes the device wrote into each request's writable buffers."""
        out = []
        for head, n in self.get_used():
            req = self.done.get(head)
            out.append((head, b"" if req is None else self.read_writable(head, n, req)))
        return out

    def wait_used(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        """``get_used`` until something comes back; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get_used()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: nothing used in {timeout}s")
            time.sleep(0.001)

    def read_writable(self, head: int, length: int, req: Request) -> bytes:
        """The first ``length`` bytes the device wrote into request ``req``'s writable buffers."""
        out = bytearray()
        for addr, n in req.writable:
            take = min(n, length - len(out))
            if take <= 0:
                break
            out += self.guest.read_ram(addr, take)
        return bytes(out)

    def request(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        """One synchronous request: add, kick, wait for it; returns (written length, the writable bytes)."""
        head = self.add(readable, writable, indirect=indirect)
        req = self.requests[head]
        self.kick()
        deadline = time.monotonic() + timeout
        while True:
            for h, n in self.wait_used(max(0.0, deadline - time.monotonic())):
                if h == head:
                    return n, self.read_writable(h, sum(w for w in writable), req)[: max(n, 0)]


class VirtioDriver(abc.ABC):
    """What a guest's virtio driver does whatever the transport (``virtio_dev_probe``): reset,
    negotiate, queues, DRIVER_OK.  A transport's driver supplies the register accesses."""

    guest: Any
    arena: Arena
    queues: dict[int, GuestQueue]
    features: int

    # --- the transport's part ----------------------------------------------------------------------

    @abc.abstractmethod
    def _get_status(self) -> int: ...

    @abc.abstractmethod
    def _put_status(self, value: int) -> None: ...

    @abc.abstractmethod
    def device_features(self) -> int: ...

    @abc.abstractmethod
    def write_features(self, features: int) -> None: ...

    @abc.abstractmethod
    def config_read(self, off: int, size: int) -> int: ...

    @abc.abstractmethod
    def setup_queues(self, sizes: dict[int, int | None] | None = None) -> list[GuestQueue]: ...

    @abc.abstractmethod
    def notify_queue(self, q: GuestQueue) -> None: ...

    # --- shared ------------------------------------------------------------------------------------

    def config_bytes(self, off: int, n: int) -> bytes:
        return b"".join(self.config_read(off + i, 1).to_bytes(1, "little") for i in range(n))

    @property
    def status(self) -> int:
        return self._get_status()

    def set_status(self, bits: int) -> None:
        self._put_status(self.status | bits)

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> VIRTIO_F_RING_EVENT_IDX & 1)

    def reset(self) -> None:
        """Write 0 to the device status and wait for it to read 0 (``vp_reset``, ``vm_reset``)."""
        self._put_status(0)
        for _ in range(1000):
            if self.status == 0:
                break
        else:
            raise DriverError("device_status did not read 0 after reset")
        self.queues.clear()
        self.arena.release()  # the device has forgotten every ring and buffer

    def negotiate(self, wanted: int) -> int:
        """ACKNOWLEDGE, DRIVER, the features both want (plus VERSION_1), FEATURES_OK read back."""
        self.reset()
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.DRIVER)
        offered = self.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise DriverError("device does not offer VIRTIO_F_VERSION_1")
        self.features = offered & (wanted | 1 << VIRTIO_F_VERSION_1)
        self.write_features(self.features)
        self.set_status(Status.FEATURES_OK)
        if not self.status & Status.FEATURES_OK:
            raise DriverError(f"device refused features {self.features:#x}")
        return self.features

    def driver_ok(self) -> None:
        self.set_status(Status.DRIVER_OK)

    def bring_up(self, wanted: int = 1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX) -> int:
        """negotiate + setup_queues + driver_ok; returns the negotiated features."""
        features = self.negotiate(wanted)
        self.setup_queues()
        self.driver_ok()
        return features

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & Status.NEEDS_RESET)

    def _rings(self, size: int) -> tuple[int, int, int]:
        """Allocate and zero a queue's descriptor table, driver and device areas."""
        desc = self.arena.alloc(desc_table_size(size), PAGE, keep=True)
        avail = self.arena.alloc(avail_size(size), 2, keep=True)
        used = self.arena.alloc(used_size(size), 4, keep=True)
        for gpa, n in ((desc, desc_table_size(size)), (avail, avail_size(size)), (used, used_size(size))):
            self.guest.write_ram(gpa, bytes(n))
        return desc, avail, used


class VirtioPciDriver(VirtioDriver):
    """Probe and drive the virtio PCI function at ``sbdf`` (see the module docstring).

    ``bar_base``: where its BARs go (in the guest's MMIO hole); ``ram``: (base, size) of the
    guest RAM it may use for rings and buffers; ``msix``: use MSI-X (else INTx + ISR)."""

    def __init__(
        self,
        guest: Any,
        sbdf: int,
        *,
        bar_base: int = 0xE0000000,
        ram: tuple[int, int] = (0x100000, 0x200000),
        msix: bool = True,
    ) -> None:
        self.guest, self.sbdf = guest, sbdf
        self.arena = Arena(*ram)
        self.use_msix = msix
        self.bars: dict[int, int] = {}
        self.caps: dict[int, Cap] = {}
        self.msix_cap = 0
        self.queues: dict[int, GuestQueue] = {}
        self.features = 0
        self._probe(bar_base)

    # --- config space ------------------------------------------------------------------------------

    def cfg_read(self, reg: int, size: int) -> int:
        return int(self.guest.pci_config_read(self.sbdf, reg, size))

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.guest.pci_config_write(self.sbdf, reg, size, value)

    def _probe(self, bar_base: int) -> None:
        if self.cfg_read(0x08, 1) < 1:
            raise DriverError("revision 0: not a modern (1.x) virtio device")
        if not self.cfg_read(0x06, 2) & 0x10:
            raise DriverError("no capability list")
        at, seen = self.cfg_read(0x34, 1) & ~3, 0
        while at and seen < 48:  # a looping list ends here (Linux: PCI_FIND_CAP_TTL = 48)
            seen += 1
            cap_id = self.cfg_read(at, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type, bar = self.cfg_read(at + 3, 1), self.cfg_read(at + 4, 1)
                if cfg_type not in self.caps and bar < 6:
                    self.caps[cfg_type] = Cap(cfg_type, bar, self.cfg_read(at + 8, 4), self.cfg_read(at + 12, 4), at)
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = at
            at = self.cfg_read(at + 1, 1) & ~3
        for need in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG):
            if need not in self.caps:
                raise DriverError(f"no virtio capability of type {need}")
        self.common, self.notify, self.isr_cap = (
            self.caps[VIRTIO_PCI_CAP_COMMON_CFG],
            self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG],
            self.caps[VIRTIO_PCI_CAP_ISR_CFG],
        )
        self.device_cap = self.caps.get(VIRTIO_PCI_CAP_DEVICE_CFG)
        self.notify_multiplier = self.cfg_read(self.notify.at + 16, 4)
        wanted = {c.bar for c in self.caps.values() if c.cfg_type != VIRTIO_PCI_CAP_PCI_CFG}
        if self.msix_cap:
            wanted.add(self.cfg_read(self.msix_cap + 4, 4) & 7)
        base = bar_base
        for bar in sorted(wanted):
            reg = 0x10 + 4 * bar
            old = self.cfg_read(reg, 4)
            self.cfg_write(reg, 4, 0xFFFFFFFF)
            mask = self.cfg_read(reg, 4)
            self.cfg_write(reg, 4, old)
            if mask & 1 or not mask & ~0xF:
                raise DriverError(f"BAR{bar} is not a memory BAR (reads {mask:#x} after sizing)")
            size = (~(mask & ~0xF) & 0xFFFFFFFF) + 1
            base = _align(base, size)
            self.cfg_write(reg, 4, base)
            self.bars[bar] = base
            base += size
        self.cfg_write(0x04, 2, self.cfg_read(0x04, 2) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    # --- BAR accesses -------------------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return int(self.guest.mmio_read(self.bars[bar] + offset, size))

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.guest.mmio_write(self.bars[bar] + offset, size, value)

    def common_read(self, off: int, size: int) -> int:
        return self.bar_read(self.common.bar, self.common.offset + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.bar_write(self.common.bar, self.common.offset + off, size, value)

    def config_read(self, off: int, size: int) -> int:
        """The device configuration (read twice around config_generation, as ``vp_modern_generation``)."""
        if self.device_cap is None:
            raise DriverError("no device configuration capability")
        while True:
            gen = self.common_read(COMMON_CFGGENERATION, 1)
            value = self.bar_read(self.device_cap.bar, self.device_cap.offset + off, size)
            if self.common_read(COMMON_CFGGENERATION, 1) == gen:
                return value

    def read_isr(self) -> int:
        return self.bar_read(self.isr_cap.bar, self.isr_cap.offset, 1)

    def _get_status(self) -> int:
        return self.common_read(COMMON_STATUS, 1)

    def _put_status(self, value: int) -> None:
        self.common_write(COMMON_STATUS, 1, value)

    def device_features(self) -> int:
        offered = 0
        for sel in (0, 1):
            self.common_write(COMMON_DFSELECT, 4, sel)
            offered |= self.common_read(COMMON_DF, 4) << (32 * sel)
        return offered

    def notify_queue(self, q: GuestQueue) -> None:
        self.bar_write(self.notify.bar, self.notify.offset + q.notify_off * self.notify_multiplier, 2, q.index)

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common_write(COMMON_GFSELECT, 4, sel)
            self.common_write(COMMON_GF, 4, features >> (32 * sel) & 0xFFFFFFFF)

    def setup_msix(self, nr_vectors: int) -> None:
        """Enable MSI-X with every entry programmed and unmasked (``pci_alloc_irq_vectors``)."""
        if not self.msix_cap:
            raise DriverError("no MSI-X capability")
        table = self.cfg_read(self.msix_cap + 4, 4)
        bir, off = table & 7, table & ~7
        size = (self.cfg_read(self.msix_cap + 2, 2) & 0x7FF) + 1
        if nr_vectors > size:
            raise DriverError(f"{nr_vectors} vectors wanted, MSI-X table has {size}")
        ctrl = self.cfg_read(self.msix_cap + 2, 2)
        self.cfg_write(self.msix_cap + 2, 2, ctrl | PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        for v in range(nr_vectors):
            entry = off + 16 * v
            self.bar_write(bir, entry, 4, MSI_ADDRESS)
            self.bar_write(bir, entry + 4, 4, 0)
            self.bar_write(bir, entry + 8, 4, FIRST_VECTOR + v)
            self.bar_write(bir, entry + 12, 4, 0)  # unmask
        self.cfg_write(self.msix_cap + 2, 2, ctrl | PCI_MSIX_FLAGS_ENABLE)

    def setup_queues(self, sizes: dict[int, int | None] | None = None) -> list[GuestQueue]:
        """Program queues (``{index: size or None for the device's maximum}``, default all),
        with MSI-X vectors 1.. (0 for configuration changes) when MSI-X is used."""
        numq = self.common_read(COMMON_NUMQ, 2)
        sizes = sizes if sizes is not None else dict.fromkeys(range(numq))
        if self.use_msix:
            self.setup_msix(len(sizes) + 1)
            self.common_write(COMMON_MSIX, 2, 0)
            if self.common_read(COMMON_MSIX, 2) != 0:
                raise DriverError("config vector not accepted")
        out = []
        for n, (index, size) in enumerate(sorted(sizes.items())):
            out.append(self.setup_queue(index, size, vector=n + 1 if self.use_msix else None))
        return out

    def setup_queue(self, index: int, size: int | None = None, *, vector: int | None = None) -> GuestQueue:
        self.common_write(COMMON_Q_SELECT, 2, index)
        max_size = self.common_read(COMMON_Q_SIZE, 2)
        if max_size == 0:
            raise DriverError(f"queue {index} does not exist")
        if self.common_read(COMMON_Q_ENABLE, 2):
            raise DriverError(f"queue {index} already enabled")
        size = max_size if size is None else size
        if size != max_size:
            self.common_write(COMMON_Q_SIZE, 2, size)
        desc, avail, used = self._rings(size)
        for lo, hi, gpa in (
            (COMMON_Q_DESCLO, COMMON_Q_DESCHI, desc),
            (COMMON_Q_AVAILLO, COMMON_Q_AVAILHI, avail),
            (COMMON_Q_USEDLO, COMMON_Q_USEDHI, used),
        ):  # vp_iowrite64_twopart
            self.common_write(lo, 4, gpa & 0xFFFFFFFF)
            self.common_write(hi, 4, gpa >> 32)
        q = GuestQueue(self, index, size, desc, avail, used)
        if vector is not None:
            self.common_write(COMMON_Q_MSIX, 2, vector)
            if self.common_read(COMMON_Q_MSIX, 2) != vector:
                raise DriverError(f"queue {index}: vector {vector} not accepted")
            q.vector = vector
        q.notify_off = self.common_read(COMMON_Q_NOFF, 2)
        self.common_write(COMMON_Q_ENABLE, 2, 1)
        self.queues[index] = q
        return q

    def msi_vector_data(self, vector: int) -> int:
        """The MSI data a vector was programmed with (what ``inject_msi`` delivers for it)."""
        return FIRST_VECTOR + vector


class VirtioMmioDriver(VirtioDriver):
    """Drive the virtio-mmio device at guest physical ``base`` as Linux's ``virtio_mmio``
    does (``vm_probe``, ``vm_setup_vq``, ``vm_interrupt``), for the simulated guest:
    32-bit register accesses, queues through QueueSel/QueueNum/QueueReady, and the
    interrupt read from InterruptStatus and acknowledged.  ``ram``: as ``VirtioPciDriver``'s."""

    def __init__(self, guest: Any, base: int, *, ram: tuple[int, int] = (0x100000, 0x200000)) -> None:
        self.guest, self.base = guest, base
        self.arena = Arena(*ram)
        self.queues = {}
        self.features = 0
        magic, version = self.reg(mmio.MAGIC_VALUE), self.reg(mmio.VERSION)
        if magic != mmio.MAGIC:
            raise DriverError(f"magic {magic:#x} at {base:#x}: no virtio-mmio device")
        if version != 2:
            raise DriverError(f"version {version}: not a modern (1.x) virtio-mmio device")
        self.device_id = self.reg(mmio.DEVICE_ID)
        if self.device_id == 0:
            raise DriverError("device id 0: a placeholder, no device")  # vm_probe: -ENODEV

    def reg(self, off: int) -> int:
        return int(self.guest.mmio_read(self.base + off, 4))

    def set_reg(self, off: int, value: int) -> None:
        self.guest.mmio_write(self.base + off, 4, value)

    def _get_status(self) -> int:
        return self.reg(mmio.STATUS) & 0xFF

    def _put_status(self, value: int) -> None:
        self.set_reg(mmio.STATUS, value)

    def device_features(self) -> int:
        offered = 0
        for sel in (1, 0):
            self.set_reg(mmio.DEVICE_FEATURES_SEL, sel)
            offered |= self.reg(mmio.DEVICE_FEATURES) << (32 * sel)
        return offered

    def write_features(self, features: int) -> None:
        for sel in (1, 0):
            self.set_reg(mmio.DRIVER_FEATURES_SEL, sel)
            self.set_reg(mmio.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)

    def config_read(self, off: int, size: int) -> int:
        """The device configuration, read around ConfigGeneration (``vm_generation``)."""
        while True:
            gen = self.reg(mmio.CONFIG_GENERATION)
            value = int(self.guest.mmio_read(self.base + mmio.CONFIG + off, size))
            if self.reg(mmio.CONFIG_GENERATION) == gen:
                return value

    def setup_queues(self, sizes: dict[int, int | None] | None = None) -> list[GuestQueue]:
        """Program queues (``{index: size or None}``, default every queue until QueueNumMax reads 0)."""
        if sizes is None:
            sizes = {}
            while len(sizes) < 1024:
                self.set_reg(mmio.QUEUE_SEL, len(sizes))
                if not self.reg(mmio.QUEUE_NUM_MAX):
                    break
                sizes[len(sizes)] = None
        return [self.setup_queue(index, size) for index, size in sorted(sizes.items())]

    def setup_queue(self, index: int, size: int | None = None) -> GuestQueue:
        m = mmio
        self.set_reg(m.QUEUE_SEL, index)
        if self.reg(m.QUEUE_READY):
            raise DriverError(f"queue {index} already ready")
        max_size = self.reg(m.QUEUE_NUM_MAX)
        if max_size == 0:
            raise DriverError(f"queue {index} does not exist")
        size = max_size if size is None else size
        self.set_reg(m.QUEUE_NUM, size)
        desc, avail, used = self._rings(size)
        for lo, gpa in ((m.QUEUE_DESC_LOW, desc), (m.QUEUE_AVAIL_LOW, avail), (m.QUEUE_USED_LOW, used)):
            self.set_reg(lo, gpa & 0xFFFFFFFF)
            self.set_reg(lo + 4, gpa >> 32)
        self.set_reg(m.QUEUE_READY, 1)
        q = GuestQueue(self, index, size, desc, avail, used)
        self.queues[index] = q
        return q

    def notify_queue(self, q: GuestQueue) -> None:
        self.set_reg(mmio.QUEUE_NOTIFY, q.index)

    def interrupt(self) -> int:
        """What Linux's ``vm_interrupt`` does first: read InterruptStatus and acknowledge it."""
        status = self.reg(mmio.INTERRUPT_STATUS)
        if status:
            self.set_reg(mmio.INTERRUPT_ACK, status)
        return status
