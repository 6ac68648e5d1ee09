"""Issue 17's fuzz, in-process part: hostile API arguments and raw ioctls on the mock, each
bounded in time, with oracles for what the issue found (silent coercion, aliased SBDFs,
allocations sized by a caller's number) and RSS and open fds asserted flat.

Seeded (``XENDMOP_FUZZ_SEED`` picks another seed; ``XENDMOP_FUZZ_SECONDS`` a longer run), so a
failure names the call that broke the rule and can be replayed."""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import gc
import mmap
import os
import random
import time
import tracemalloc
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from functools import partial
from typing import Any

import psutil
import pytest

from xendmop import ArgumentError, DeviceModel, XenError
from xendmop.abi import evtchn as evtchn_abi
from xendmop.abi import privcmd as privcmd_abi
from xendmop.mock import MockXen
from xendmop.runtime.dispatch import GuestMemoryError
from xendmop.runtime.evtchn import EventChannel
from xendmop.runtime.foreignmemory import ForeignMemory, GuestRam
from xendmop.runtime.server import IoreqServer
from xendmop.types import BufIoreq, CacheAttr, EventType, HvmMemType, MemAccess, ShutdownReason

SEED = int(os.environ.get("XENDMOP_FUZZ_SEED", "17"))
SECONDS = float(os.environ.get("XENDMOP_FUZZ_SECONDS", "4"))
#: what one call may allocate (Python objects; the guest-memory-sized answers are smaller)
CALL_PEAK = 24 << 20
#: what one call may take (the slowest legitimate ones here: a full 8 MiB guest read)
CALL_SECONDS = 3.0
#: RSS growth allowed over the last two thirds of a run (the allocator's arenas move by some MiB
#: in a full suite; the leaks this guards against were GiB)
RSS_SLACK = 48 << 20

ODD = [1.5, 2.0, "3", b"2", Decimal(1), Fraction(2, 1), None, [1], True, False, CacheAttr.WB, ShutdownReason.reboot]
EDGE = [0, 1, 2, 7, 8, 15, 16, 31, 32, 255, 256, 0xFFFF, 0x10000, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64]
EDGE.append(2**70)


def _int(rng: random.Random) -> int:
    value = rng.choice(EDGE) if rng.random() < 0.7 else rng.getrandbits(rng.choice((3, 8, 16, 33, 65)))
    return -value if rng.random() < 0.1 else value


def _value(rng: random.Random, kind: str) -> object:
    """A hostile value for an argument of ``kind``: mostly ints at the edges, some not ints.
    A "pages" argument (set_mem_type's nr, relocate_memory's size) is at most 4096 when an int:
    Xen does that work page by page, with continuations, for as many pages as the guest's p2m
    spans (holes included: HVMMEM_mmio_dm), so a large one is legitimately long, here as there."""
    if rng.random() < 0.25:
        return rng.choice(ODD)
    if kind == "pages":
        return rng.choice([0, 1, 2, 255, 256, 4096])
    if kind in ENUMS and rng.random() < 0.5:
        return rng.choice(list(ENUMS[kind]))
    return _int(rng)


ENUMS: dict[str, type[enum.Enum]] = {
    "bufioreq": BufIoreq,
    "memtype": HvmMemType,
    "cache": CacheAttr,
    "event": EventType,
    "reason": ShutdownReason,
    "access": MemAccess,
}

#: DeviceModel method -> kinds of its arguments after the domid ("int", an ENUMS key, "bool")
METHODS: dict[str, tuple[str, ...]] = {
    "create_ioreq_server": ("bufioreq",),
    "get_ioreq_server_info": ("int",),
    "map_io_range_to_ioreq_server": ("int", "bool", "int", "int"),
    "unmap_io_range_from_ioreq_server": ("int", "bool", "int", "int"),
    "map_pcidev_to_ioreq_server": ("int", "int", "int", "int", "int"),
    "unmap_pcidev_from_ioreq_server": ("int", "int", "int", "int", "int"),
    "map_mem_type_to_ioreq_server": ("int", "memtype", "access"),
    "set_ioreq_server_state": ("int", "bool"),
    "destroy_ioreq_server": ("int",),
    "set_pci_intx_level": ("int", "int", "int", "int", "int"),
    "set_isa_irq_level": ("int", "int"),
    "set_irq_level": ("int", "int"),
    "set_pci_link_route": ("int", "int"),
    "inject_msi": ("int", "int"),
    "inject_event": ("int", "int", "event", "int", "int", "int"),
    "track_dirty_vram": ("int", "int"),
    "modified_memory": ("int", "int"),
    "set_mem_type": ("memtype", "int", "pages"),
    "relocate_memory": ("pages", "int", "int"),
    "pin_memory_cacheattr": ("int", "int", "cache"),
    "shutdown": ("reason",),
    "nr_vcpus": (),
}
#: kinds whose argument C takes as a bool or an enum: a bool, or that enum's member, is accepted
BOOLISH = {"bool"}


def _acceptable(kind: str, value: object) -> bool:
    """May a call with ``value`` for a ``kind`` argument be accepted at all (range aside)?"""
    if value.__class__ is int:
        return True
    if kind in BOOLISH and isinstance(value, int):  # C's int 0/1: a bool, or an int of 0 or 1
        return True
    if kind in ENUMS and isinstance(value, ENUMS[kind]):
        return True
    if kind in ("int", "pages") and isinstance(value, int):  # a plain field: any int, a level's bool, an IntEnum
        return True
    return False


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    gc.collect()  # what is garbage now is no growth
    return int(psutil.Process().memory_info().rss)


class Budget:
    """The run's clock: ``more()`` until ``SECONDS`` are spent; ``warm()`` once, when a third
    of it is (every cache, log and guest page a run touches exists by then: the baseline
    for RSS and fds)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._warm = False

    def more(self) -> bool:
        return time.monotonic() < self.start + SECONDS

    def warm(self) -> bool:
        if not self._warm and time.monotonic() > self.start + SECONDS / 3:
            self._warm = True
            return True
        return False


@pytest.fixture
def budget() -> Budget:
    return Budget()


def _bounded(what: str, fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run one call: its result or exception, failing the test if it took or allocated too much."""
    tracemalloc.reset_peak()
    started = time.monotonic()
    result: Any = None
    raised: BaseException | None = None
    try:
        result = fn()
    except (TypeError, ValueError, OSError, LookupError, GuestMemoryError) as e:
        raised = e
    took = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    assert took < CALL_SECONDS, f"{what}: {took:.1f} s"
    assert peak < CALL_PEAK, f"{what}: allocated {peak >> 20} MiB"
    return result, raised


def test_fuzz_api_arguments(budget: Budget) -> None:
    rng = random.Random(SEED)
    host = MockXen()
    domid = host.create_domain(vcpus=2, hvm=True, memory_mb=8)
    dm = DeviceModel.open("mock", xen=host)
    fmem = ForeignMemory(host.open_device)
    evtchn = EventChannel(host.open_device)
    ram = GuestRam(fmem, domid)
    fds, calls = None, 0
    tracemalloc.start()
    try:
        while budget.more() or calls < 300:
            calls += 1
            if budget.warm():
                for gpa in range(0, 16 << 20, 4096):  # every guest page (memfd pages count in RSS once touched)
                    try:
                        ram.read(gpa, 1)
                    except GuestMemoryError:
                        pass  # not RAM (any more: set_mem_type, relocate_memory)
                fds, rss = _fds(), _rss()
            which = rng.random()
            if which < 0.7:
                method = rng.choice(sorted(METHODS))
                kinds = METHODS[method]
                if method == "shutdown" and rng.random() < 0.9:
                    continue  # a shut-down guest answers little else: rarely, and late in a run
                args = [_value(rng, k) for k in kinds]
                what = f"{method}{tuple(args)!r}"
                _, raised = _bounded(what, partial(getattr(dm, method), domid, *args))
                if raised is None:  # accepted: no argument may have been coerced into an int
                    bad = [(k, a) for k, a in zip(kinds, args) if not _acceptable(k, a)]
                    assert not bad, f"{what} was accepted with {bad}"
                else:
                    assert isinstance(raised, (TypeError, ArgumentError, XenError)), f"{what}: {raised!r}"
            elif which < 0.8:
                where = {k: _value(rng, "int") for k in ("segment", "bus", "slot", "function")}
                server = IoreqServer(dm, domid, opener=host.open_device)
                _, raised = _bounded(f"add_pci({where})", partial(server.add_pci, _Dev(), **where))  # type: ignore[arg-type]
                fits = all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top
                    for v, top in zip(where.values(), (0xFFFF, 0xFF, 0x1F, 7))  # segment, bus, slot, function
                )
                assert (raised is None) == fits, f"add_pci({where}): {raised!r}"
                server.close()
            elif which < 0.9:
                gpa, size = abs(_int(rng)) % (1 << 48), abs(_int(rng))
                _, raised = _bounded(f"GuestRam.read({gpa:#x}, {size:#x})", partial(ram.read, gpa, size))
                assert raised is None or isinstance(raised, GuestMemoryError), repr(raised)
            else:
                limit = _value(rng, "int")
                _, raised = _bounded(f"pending_ports({limit!r})", partial(evtchn.pending_ports, limit))  # type: ignore[arg-type]
                fits = isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= 1024
                assert (raised is None) == fits, f"pending_ports({limit!r}): {raised!r}"
        ram.invalidate()
        assert fds is not None
        assert _fds() <= fds, "open fds grew"
        assert _rss() - rss < RSS_SLACK, f"RSS grew {(_rss() - rss) >> 20} MiB over {calls} calls"
    finally:
        tracemalloc.stop()
        ram.close()
        evtchn.close()
        fmem.close()
        dm.close()
        host.close()


class _Dev:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


# --- raw ioctls --------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


#: the most one copy_from_user of the mock kernel may move in one go: Linux copies MMAPBATCH's
#: array a page at a time (gather_array); the mock reads 64 KiB chunks up to GATHER_MAX
COPY_MAX = 1 << 20


class _CopyBound:
    """The host's user memory, failing the test on a single copy past ``COPY_MAX`` (the
    in-process MMAPBATCH once read ``8 * num`` bytes at once: 3 GiB for num=0x17727a23)."""

    def __init__(self, memory: Any) -> None:
        self._memory = memory

    def read(self, addr: int, nbytes: int) -> bytes:
        assert nbytes <= COPY_MAX, f"one copy_from_user of {nbytes} bytes"
        return bytes(self._memory.read(addr, nbytes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._memory, name)


def _struct(rng: random.Random, cls: type[ctypes.Structure], pointers: list[int]) -> ctypes.Structure:
    """``cls`` with each field random: edge ints, or a pointer to readable memory."""
    obj = cls()
    for name, ctype, *_ in cls._fields_:
        if issubclass(ctype, ctypes.Array):
            continue
        size = ctypes.sizeof(ctype)
        if ctype is ctypes.c_void_p or (size == 8 and rng.random() < 0.3):
            value = rng.choice(pointers) if rng.random() < 0.8 else _int(rng)
        else:
            value = _int(rng)
        setattr(obj, name, abs(value) % (1 << (8 * size)))
    return obj


def test_fuzz_raw_ioctls(budget: Budget) -> None:
    rng = random.Random(SEED + 1)
    host = MockXen()
    hvm = host.create_domain(vcpus=2, hvm=True, memory_mb=4)
    host.create_domain(vcpus=1, hvm=False, memory_mb=1)
    # memory for the pointers: 64 KiB of frame numbers (gfns in the guest) and then a PROT_NONE
    # page, so that whatever a hostile length makes the mock read or write past it faults there
    # (as it would in the kernel) instead of reaching this interpreter's heap
    size = 1 << 16
    area = mmap.mmap(-1, size + mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert _libc.mprotect(ctypes.c_void_p(base + size), mmap.PAGESIZE, 0) == 0
    ctypes.memmove(base, (ctypes.c_uint64 * (size // 8))(*[rng.randrange(0x400) for _ in range(size // 8)]), size)
    pointers = [base, base + size - 8, base + size - 32, 0, 0x10]
    structs = {
        privcmd_abi.IOCTL_PRIVCMD_HYPERCALL: privcmd_abi.privcmd_hypercall,
        privcmd_abi.IOCTL_PRIVCMD_DM_OP: privcmd_abi.privcmd_dm_op,
        privcmd_abi.IOCTL_PRIVCMD_MMAPBATCH_V2: privcmd_abi.privcmd_mmapbatch_v2,
        privcmd_abi.IOCTL_PRIVCMD_MMAP_RESOURCE: privcmd_abi.privcmd_mmap_resource,
        evtchn_abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT: evtchn_abi.ioctl_evtchn_bind_unbound_port,
        evtchn_abi.IOCTL_EVTCHN_BIND_INTERDOMAIN: evtchn_abi.ioctl_evtchn_bind_interdomain,
        evtchn_abi.IOCTL_EVTCHN_UNBIND: evtchn_abi.ioctl_evtchn_unbind,
        evtchn_abi.IOCTL_EVTCHN_NOTIFY: evtchn_abi.ioctl_evtchn_notify,
    }
    calls, fds = 0, None
    tracemalloc.start()
    try:
        while budget.more() or calls < 300:
            calls += 1
            if budget.warm():
                fds, rss = _fds(), _rss()
            request = rng.choice(sorted(structs))
            path = "/dev/xen/evtchn" if structs[request].__name__.startswith("ioctl_evtchn") else "/dev/xen/privcmd"
            dev = host.open_device(path, memory=_CopyBound(host.memory))
            mmap_len = 4096 * rng.choice((1, 2))
            vma = dev.mmap(mmap_len) if path.endswith("privcmd") else None
            try:
                arg = _struct(rng, structs[request], pointers)
                if vma is not None and request == privcmd_abi.IOCTL_PRIVCMD_MMAPBATCH_V2 and rng.random() < 0.7:
                    anchor = ctypes.c_char.from_buffer(vma)
                    arg.addr, arg.dom = ctypes.addressof(anchor), hvm  # type: ignore[attr-defined]
                    del anchor
                what = f"ioctl {request:#x} {bytes(arg).hex()} (vma {mmap_len})"
                _, raised = _bounded(what, partial(dev.ioctl, request, arg))
                assert raised is None or (isinstance(raised, OSError) and raised.errno), f"{what}: {raised!r}"
                if request == evtchn_abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT:
                    # Linux truncates remote_domain to domid_t, Xen looks nothing up: always a port
                    assert raised is None or raised.errno == errno.ENOSPC, f"{what}: {raised!r}"  # type: ignore[union-attr]
            finally:
                if vma is not None:
                    vma.close()
                dev.close()
        assert fds is not None
        assert _fds() <= fds, "open fds grew"
        assert _rss() - rss < RSS_SLACK, f"RSS grew {(_rss() - rss) >> 20} MiB over {calls} calls"
    finally:
        tracemalloc.stop()
        host.close()
